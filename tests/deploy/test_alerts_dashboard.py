"""The shipped alerts (deploy/prometheus/rules.yml) and dashboard
(deploy/grafana/im-backend.json) stay true to the code.

- promtool accepts the rules and their unit tests pass (rules_test.yml, with a case
  where each alert fires and one where it stays quiet), and every dashboard query
  parses as PromQL;
- every metric name they use is exposed by a running stack: the whole system runs
  as processes with a metrics port each, carries one message, and every service's
  /metrics is scraped. The label names they select or group by exist on those
  metrics, and every metric they use has samples after that message (but the few
  that only count failures);
- docs/operations.md points to the files instead of holding a copy of the rules.

promtool comes from Debian's `prometheus` package (`make system-deps`). Without it
the promtool tests skip, but never where CI is set: there they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, ROOT

from imclient import Client, direct_conversation_id
from imdev.servers import free_port
from imdev.stack import Stack

RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "im-backend.json"
OPERATIONS = ROOT / "docs" / "operations.md"

SERVICES = ("seqsvc", "logic", "pusher", "gateway")
SEVERITIES = {"critical", "warning"}
#: Labels Prometheus adds to every scraped series (not exposed by the services).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
#: Labelled counters that count only failures or repairs: a healthy message leaves
#: them without samples (their names are still checked against the TYPE lines).
FAILURE_ONLY = {"im_logic_repair_actions_total", "im_gateway_acks_dropped_total"}


# -- reading PromQL --------------------------------------------------------------

_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "atan2", "inf", "nan",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_TOKEN = re.compile(r"(?<![\w:$.])[a-zA-Z_:][\w:]*")


def _unquoted(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords, labels
    or Grafana variables)."""
    text = _unquoted(expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _TOKEN.finditer(text):
        if m.group() in _WORDS or text[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def selected_labels(expr: str) -> set[tuple[str, str]]:
    """(metric, label name) of every label matcher in `metric{...}`."""
    return {
        (metric, label)
        for metric, body in _SELECTOR.findall(_unquoted(expr))
        for label in _MATCHER.findall(body)
    }


def grouping_labels(expr: str) -> set[str]:
    """Label names of every by/without/on/ignoring/group_* clause."""
    return {
        label.strip()
        for body in _GROUPING.findall(_unquoted(expr))
        for label in body.split(",")
        if label.strip()
    }


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(im_a_seconds_bucket{method=~"x|y"}'
        "[$__rate_interval]))) / sum(rate(im_b_total[5m] offset 1h)) > 0.5 "
        'and on (job) absent(im_c) or label_replace(im_d, "service", "e", "", "") '
        'unless sum without (code) (im_e{code!="OK"}) > bool 1e3'
    )
    assert metric_names(expr) == {"im_a_seconds_bucket", "im_b_total", "im_c", "im_d", "im_e"}
    assert selected_labels(expr) == {("im_a_seconds_bucket", "method"), ("im_e", "code")}
    assert grouping_labels(expr) == {"le", "job", "code"}


# -- the files ----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def used_exprs() -> dict[str, str]:
    """Every expression of the rules and the dashboard, by where it is."""
    out = {f"alert {r['alert']}": r["expr"] for r in alert_rules()}
    out.update({f"dashboard query {i}": e for i, e in enumerate(dashboard_exprs())})
    return out


def test_every_alert_has_for_severity_and_what_to_do() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        notes = rule["annotations"]
        assert notes.get("summary") and notes.get("description"), rule["alert"]
        assert len(notes["description"]) > 80, f"{rule['alert']}: say what to do"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    spec = yaml.safe_load(RULES_TEST.read_text())
    assert spec["rule_files"] == [RULES.name]
    for test in spec["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a case where they fire"
    assert names - quiet == set(), "alerts without a case where they stay quiet"
    assert (fires | quiet) - names == set(), "unit tests of alerts that do not exist"


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource"}
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        boxes.append((p["title"], pos))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), p["title"]
        targets = p["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), p["title"]
        for t in targets:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
    for i, (a, pa) in enumerate(boxes):
        for b, pb in boxes[i + 1 :]:
            apart = (
                pa["x"] + pa["w"] <= pb["x"] or pb["x"] + pb["w"] <= pa["x"]
                or pa["y"] + pa["h"] <= pb["y"] or pb["y"] + pb["h"] <= pa["y"]
            )  # fmt: skip
            assert apart, f"panels {a!r} and {b!r} overlap"


def test_dashboard_covers_the_brief() -> None:
    """The dashboard shows what an operator looks at first (issue 14)."""
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for name in [
        "im_gateway_sends_total",
        "im_rpc_server_latency_seconds_bucket",
        "im_logic_outbox_oldest_age_seconds",
        "im_logic_fanout_pending_conversations",
        "im_logic_fanout_overdue_conversations",
        "im_pusher_jetstream_pending",
        "im_pusher_commit_to_push_seconds_bucket",
        "im_pusher_pushes_total",
        "im_pusher_gave_up_total",
        "im_gateway_catchup_pushes_total",
        "im_gateway_head_lookups_total",
        "im_gateway_connections",
        "im_seqsvc_serving",
        "im_seqsvc_waits_total",
        "im_rpc_server_handled_total",
    ]:
        assert name in used, name


def test_operations_doc_points_to_the_files() -> None:
    doc = OPERATIONS.read_text()
    assert "deploy/prometheus/rules.yml" in doc
    assert "deploy/grafana/im-backend.json" in doc
    assert not re.search(r"^\s*expr:", doc, re.M), "the rules belong in rules.yml only"
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is not explained"


# -- promtool ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing; `make system-deps` installs Debian's prometheus")
        pytest.skip("promtool is not installed (`make system-deps`: Debian's prometheus)")
    return path


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_accepts_the_rules(promtool: str) -> None:
    output = run([promtool, "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_promtool_unit_tests_pass(promtool: str) -> None:
    assert "SUCCESS" in run([promtool, "test", "rules", str(RULES_TEST)])


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool has no query linter: the queries go into a rule file as recording
    rules, which `check rules` parses (Grafana's variables replaced by values)."""
    rules = [
        {"record": f"im:dashboard_query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([promtool, "check", "rules", str(path)])


# -- a running stack --------------------------------------------------------------


@dataclass
class Exposed:
    """What the services' /metrics endpoints declare and what they have samples of."""

    declared: dict[str, set[str]] = field(default_factory=dict)  # name -> services
    labels: dict[str, set[str]] = field(default_factory=dict)  # sampled name -> label names

    def add(self, service: str, text: str) -> None:
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
            if kind == "histogram":
                names = [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
            elif kind == "counter":
                names = [name if name.endswith("_total") else f"{name}_total"]
            else:
                names = [name]
            for n in names:
                self.declared.setdefault(n, set()).add(service)
        for name, labels in re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? \S+$", text, re.M):
            self.labels.setdefault(name, set()).update(re.findall(r"(\w+)=\"", labels))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def scrape_all(ports: dict[str, int]) -> Exposed:
    exposed = Exposed()
    for service, port in ports.items():
        exposed.add(service, scrape(port))
    return exposed


def missing_samples(exposed: Exposed, names: Iterable[str]) -> set[str]:
    return {n for n in names if n not in exposed.labels} - FAILURE_ONLY


async def one_message(stack: Stack) -> None:
    """alice sends bob a message and bob receives it (the SDK ACKs it)."""
    tag = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{tag}", f"bob-{tag}"
    async with (
        Client(stack.gateway_addresses, stack.mint(alice, "a1")) as a,
        Client(stack.gateway_addresses, stack.mint(bob, "b1")) as b,
    ):
        sent = await a.send(direct_conversation_id(alice, bob), "metrics")

        async def receive() -> None:
            async for m in b.messages():
                if m.msg_id == sent.msg_id:
                    return

        await asyncio.wait_for(receive(), 30)


@pytest.fixture(scope="module")
def exposed() -> Iterator[Exposed]:
    """The stack's metrics once one message went through it and every metric the
    rules and the dashboard use has samples (or 30 s passed: the tests say what is
    missing). The stack is stopped before the tests look."""
    ports = {svc: free_port() for svc in SERVICES}
    env = {svc: {f"IM_{svc.upper()}_METRICS_PORT": str(ports[svc])} for svc in SERVICES}
    env["logic"]["IM_LOGIC_METRICS_SAMPLE_S"] = "0.2"
    env["pusher"]["IM_PUSHER_METRICS_SAMPLE_S"] = "0.2"
    env["gateway"]["IM_GATEWAY_HEADS_INTERVAL_S"] = "0.5"  # head lookups soon
    workdir = Path(tempfile.mkdtemp(prefix="imstack-alerts-"))
    workdir.chmod(0o755)
    stack = Stack(workdir, env=env)
    used = set().union(*(metric_names(e) for e in used_exprs().values()))
    try:
        stack.start()
        asyncio.run(one_message(stack))
        deadline = time.monotonic() + 30
        while True:
            got = scrape_all(ports)
            if not missing_samples(got, used) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        yield got
    finally:
        stack.kill()
        if not os.environ.get("IM_KEEP_TEST_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)


def test_every_metric_of_the_rules_and_dashboard_is_exposed(exposed: Exposed) -> None:
    unknown = {
        f"{where}: {name}"
        for where, expr in used_exprs().items()
        for name in metric_names(expr)
        if name not in exposed.declared
    }
    assert unknown == set()
    assert set(exposed.declared) >= FAILURE_ONLY


def test_every_used_metric_has_samples_after_a_message(exposed: Exposed) -> None:
    used = set().union(*(metric_names(e) for e in used_exprs().values()))
    assert missing_samples(exposed, used) == set()


def test_selected_and_grouped_labels_exist(exposed: Exposed) -> None:
    wrong = []
    for where, expr in used_exprs().items():
        for metric, label in selected_labels(expr):
            have = exposed.labels.get(metric)
            if have is not None and label not in have | TARGET_LABELS:
                wrong.append(f"{where}: {metric} has no label {label!r} ({sorted(have)})")
        metrics = metric_names(expr)
        if all(m in exposed.labels for m in metrics):
            have = set().union(*(exposed.labels[m] for m in metrics)) | TARGET_LABELS
            wrong += [f"{where}: no metric has {lb!r}" for lb in grouping_labels(expr) - have]
    assert wrong == []
