"""imcommon.config: typed settings from env vars, with errors naming the variable."""

from __future__ import annotations

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from imcommon.config import ConfigError, describe_settings, load_settings
from imcommon.settings import ServerSettings


class DemoSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="IM_DEMO_", extra="ignore", frozen=True)
    secret_fields = frozenset({"token"})

    batch: int = Field(10, ge=1, le=100, description="Items per batch.")
    token: str = Field("", description="A secret.")


def test_defaults_and_overrides() -> None:
    s = load_settings(DemoSettings, {"IM_DEMO_BATCH": "42", "IM_OTHER_X": "1"})
    assert s.batch == 42
    assert s.port == 0
    assert s.log_level == "info"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IM_DEMO_BATCH": "many"}, "IM_DEMO_BATCH"),
        ({"IM_DEMO_BATCH": "1000"}, "IM_DEMO_BATCH"),
        ({"IM_DEMO_PORT": "70000"}, "IM_DEMO_PORT"),
        ({"IM_DEMO_LOG_LEVEL": "loud"}, "IM_DEMO_LOG_LEVEL"),
        ({"IM_DEMO_BACTH": "5"}, "IM_DEMO_BACTH"),  # a typo is not silently ignored
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(DemoSettings, env)
    assert named in str(err.value)


def test_describe_hides_secrets() -> None:
    text = describe_settings(DemoSettings, {"IM_DEMO_TOKEN": "hunter2"})
    assert "IM_DEMO_BATCH=10" in text
    assert "Items per batch." in text
    assert "hunter2" not in text
    assert "IM_DEMO_TOKEN='***'" in text or "IM_DEMO_TOKEN=***" in text
