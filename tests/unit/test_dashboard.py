"""The Grafana dashboard and the Prometheus configuration in deploy/ ask for what exists."""

import json
import re
from typing import Any

import yaml

from shared.app.compose import STAGE_PORT
from shared.metrics import Metrics
from tests.support import ROOT, STAGE_NAMES

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana/dashboards/orchestrator.json"
NAME = re.compile(r"\borchestrator_[a-z0-9_]+")
AGGREGATION_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR_LABELS = re.compile(r"[{,]\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
LEGEND_LABELS = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def exposed() -> dict[str, set[str]]:
    """Every series name a Metrics() registry exposes, with the labels it carries."""
    metrics = Metrics()
    types = {family.name: family.type for family in metrics.registry.collect()}
    assert {f.name for f in metrics.families} == set(types)  # every family registered is seen
    found: dict[str, set[str]] = {}
    for family in metrics.families:
        # The declared label names: an exposition shows only those of existing series.
        name, labels = family.name, set(family.labelnames)
        kind = types[name]
        if kind == "counter":
            found[f"{name}_total"] = labels
        elif kind == "histogram":
            found[f"{name}_bucket"] = labels | {"le"}
            found[f"{name}_sum"] = found[f"{name}_count"] = labels
        else:
            found[name] = labels
    return found


def dashboard() -> dict[str, Any]:
    """The dashboard, parsed."""
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def targets(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every query of every panel."""
    return [t for p in panels(board) for t in p.get("targets", [])]


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' and the template variables'."""
    found = [t["expr"] for t in targets(board)]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        found.append(query["query"] if isinstance(query, dict) else query)
    return found


def test_every_metric_the_dashboard_asks_for_is_one_the_stages_expose():
    names = exposed()
    used = {name for expr in queries(dashboard()) for name in NAME.findall(expr)}
    assert used, "no orchestrator_ metric in the dashboard"
    assert used <= names.keys(), sorted(used - names.keys())


def test_every_metric_the_stages_expose_is_on_the_dashboard():
    used = {name for expr in queries(dashboard()) for name in NAME.findall(expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exposed()}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, sorted(families - shown)


def test_every_label_the_dashboard_groups_selects_or_shows_is_on_its_metrics():
    names = exposed()
    for target in targets(dashboard()):
        expr = target["expr"]
        labels = set().union(*(names[n] for n in NAME.findall(expr)))
        grouped = {g.strip() for by in AGGREGATION_LABELS.findall(expr) for g in by.split(",")}
        selected = set(SELECTOR_LABELS.findall(expr))
        shown = set(LEGEND_LABELS.findall(target.get("legendFormat", "")))
        unknown = (grouped | selected | shown) - labels - {""}
        assert not unknown, (expr, sorted(unknown))


def test_the_stage_variable_filters_the_panels():
    board = dashboard()
    (variable,) = board["templating"]["list"]
    assert variable["name"] == "stage" and variable["includeAll"] and variable["multi"]
    exprs = [t["expr"] for t in targets(board)]
    filtered = [e for e in exprs if 'stage=~"$stage"' in e]
    # All but the end-to-end latency, which only the last stage records.
    assert all("request_duration" in e for e in exprs if e not in filtered)
    assert len(filtered) > len(exprs) / 2


def test_panels_are_unique_fit_the_grid_and_use_the_provisioned_datasource():
    board = dashboard()
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    (source,) = datasources
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}
            assert panel["targets"], panel["title"]
    for target in targets(board):
        assert target["datasource"]["uid"] == source["uid"]
    assert board["uid"] == "orchestrator"


def test_the_dashboard_provider_reads_where_compose_mounts_the_dashboards():
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/orchestrator.yml").read_text(encoding="utf-8")
    )["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_the_prometheus_config_is_yaml_naming_every_stage_of_the_built_in_graph():
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == STAGE_NAMES
    assert sd["type"] == "A" and sd["port"] == STAGE_PORT
