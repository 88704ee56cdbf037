"""What ships under monitoring/: the alert rules run by the real promtool against their unit
tests, and every metric the rules and the Grafana dashboard query is one the real service
serves (scraped over HTTP from a running service)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Set

import pytest_twisted
import treq
from helpers.faults import WithMetrics
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for
from test_metrics import CLIENT_A, STREAMERS, record
from test_status import tool

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "sfive-ngxlua-alerts.yml"
RULE_TESTS = MONITORING / "sfive-ngxlua-alerts.test.yml"
DASHBOARD = MONITORING / "sfive-ngxlua-dashboard.json"
T0 = 1_800_000_000
D = 10

PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile",
    "rate", "irate", "increase", "deriv", "delta", "idelta", "time", "vector", "scalar",
    "absent", "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time",
    "label_values", "humanize",
}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool", "prometheus"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid():
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 14 rules found" in done.stdout


def test_the_rules_pass_their_unit_tests():
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_unit_tests_bite(tmp_path):
    """A rule that no longer fires makes promtool's unit tests fail."""
    shutil.copy(RULE_TESTS, tmp_path)
    broken = RULES.read_text().replace("sfive_ngxlua_source_connected == 0",
                                       "sfive_ngxlua_source_connected == 2")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    done = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0 and "SfiveNgxluaSourceDown" in done.stdout + done.stderr


def test_every_alert_is_unit_tested():
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s+alertname: (\w+)$", RULE_TESTS.read_text(), re.M))
    assert len(alerts) == 14 and alerts == tested


def metric_names(expr: str) -> Iterator[str]:
    """The metric names a PromQL expression (or label_values query) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r",\s*\w+\s*\)", ")", expr)  # label_values(metric, label)
    for word in re.findall(r"(?<![0-9A-Za-z_:.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if word not in PROMQL_WORDS:
            yield word


def test_metric_names_are_extracted_as_prometheus_would():
    assert set(metric_names(
        'sum by (reason) (rate(sfive_ngxlua_x_total{job=~"$job", a="b{c}"}[$__rate_interval]))'
        ' > on (job, instance) 0.8 * time() - process_start_time_seconds offset 5m'
    )) == {"sfive_ngxlua_x_total", "process_start_time_seconds"}
    assert list(metric_names('label_values(sfive_ngxlua_build_info{job=~"$job"}, instance)')) \
        == ["sfive_ngxlua_build_info"]


def rule_exprs(text: str) -> Iterator[str]:
    """Each rule's ``expr``, inline or folded (``>-`` and the more indented lines below)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key = re.match(r"^(\s+)expr: (.*)$", line)
        if key is None:
            continue
        if key.group(2) != ">-":
            yield key.group(2)
            continue
        folded = []
        for more in lines[i + 1:]:
            if len(more) - len(more.lstrip()) <= len(key.group(1)):
                break
            folded.append(more.strip())
        yield " ".join(folded)


def used_metrics() -> Set[str]:
    rules = list(rule_exprs(RULES.read_text()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    assert len(rules) == 14 and len(exprs) > 20
    return {name for expr in rules + exprs for name in metric_names(expr)}


@pytest_twisted.inlineCallbacks
def test_the_rules_and_the_dashboard_use_only_metrics_the_service_serves(tmp_path):
    run = WithMetrics(tmp_path, T0, D, ["--state-dir", str(tmp_path / "st")])
    clock, exporter, top = run.clock, run.exporter, run.top
    try:
        yield run.start()
        port = run.port
        exporter.send(record(T0 + 1, STREAMERS[0], CLIENT_A, 100, 1))
        yield wait_for(lambda: top.stats.lines == 1)
        clock.advance(D + 1)
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False)
        body = yield treq.text_content(response)
    finally:
        yield run.stop()
    served = set()
    for family in text_string_to_metric_families(body):
        served.add(family.name + ("_total" if family.type == "counter" else ""))
        served.update(sample.name for sample in family.samples)
    used = used_metrics()
    assert used - served == set()
    for name in ("sfive_ngxlua_source_connected", "sfive_ngxlua_stream_clients",
                 "sfive_ngxlua_datasets_dropped_total", "process_start_time_seconds",
                 "sfive_ngxlua_healthy", "sfive_ngxlua_watermark_lag_seconds"):
        assert name in used, name


def test_the_debian_package_ships_them_as_examples():
    examples = (ROOT / "debian" / "sfive-ngxlua.examples").read_text().split()
    for path in (RULES, RULE_TESTS, DASHBOARD):
        assert str(path.relative_to(ROOT)) in examples


def test_the_dashboard_is_importable_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for subject in ("viewers", "bytes", "rejections", "lag", "queue", "healthy"):
        assert subject in titles

