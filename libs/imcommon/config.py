"""Typed settings loaded from environment variables.

Each service declares one `BaseServiceSettings` subclass. Every field has a default
and a description (`Field(description=...)`); the env var of field `port` of a
service whose prefix is `IM_GATEWAY_` is `IM_GATEWAY_PORT`. Invalid values stop the
service before anything starts, with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A setting is missing or invalid. The message names the env var."""


class BaseServiceSettings(BaseSettings):
    """Base of every service's settings. Subclasses set `model_config` with their
    own `env_prefix` and declare fields with defaults and descriptions."""

    model_config = SettingsConfigDict(env_prefix="IM_", extra="ignore", frozen=True)

    #: Settings whose values are secrets; printed as "***".
    secret_fields: ClassVar[frozenset[str]] = frozenset()


S = TypeVar("S", bound=BaseServiceSettings)


def env_name(cls: type[BaseServiceSettings], field: str) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Builds settings from `environ` (default: the process environment).

    Raises ConfigError naming every invalid variable.
    """
    env = os.environ if environ is None else environ
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    known = {env_name(cls, name) for name in cls.model_fields}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in env.items():
        upper = key.upper()
        if not upper.startswith(prefix):
            continue
        if upper in known:
            values[upper[len(prefix) :].lower()] = value
        elif prefix and prefix != "IM_":
            unknown.append(key)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))} for {cls.__name__}")
    try:
        # Values are passed explicitly so that the result depends on `environ` only.
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{env_name(cls, field)}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def describe_settings(
    cls: type[BaseServiceSettings], environ: Mapping[str, str] | None = None
) -> str:
    """Every setting of a service: env var, value (from `environ`, else the
    default; secrets masked), description. Does not validate, so it also documents
    a configuration that `load_settings` would refuse."""
    env = os.environ if environ is None else environ
    lines = []
    for name, info in cls.model_fields.items():
        var = env_name(cls, name)
        value: Any = env.get(var, info.default)
        shown = "***" if name in cls.secret_fields and value else repr(value)
        lines.append(f"{var}={shown}\n    {info.description or ''}")
    return "\n".join(lines)
