"""The PromQL expressions shipped in deploy/ (Grafana dashboards, Prometheus alert rules) and
the metric names they use; shared by the unit and the real-Prometheus tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana").glob("*.json"))
RULE_FILES = sorted((REPO / "deploy" / "prometheus").glob("alerts*.yml"))
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
_NAME = re.compile(r"\b(tandem_[a-zA-Z0-9_]+)\b")
# Grafana's template variables, replaced by what "All" means when a query runs outside Grafana.
_GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$model": ".*"}


def _walk(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        found = [node[key]] if key in node else []
        return found + [x for v in node.values() for x in _walk(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _walk(v, key)]
    return []


def dashboard_exprs() -> list[str]:
    """Every panel query of every dashboard, as written (with Grafana variables)."""
    return [
        e
        for path in DASHBOARDS
        for e in _walk(json.loads(path.read_text()), "expr")
        if isinstance(e, str)
    ]


def dashboard_variable_queries() -> list[str]:
    """Template variable queries (Grafana functions such as label_values, not PromQL)."""
    queries = []
    for path in DASHBOARDS:
        for var in json.loads(path.read_text()).get("templating", {}).get("list", []):
            if isinstance(var.get("definition"), str):
                queries.append(var["definition"])
    return queries


def rule_exprs() -> list[str]:
    return [
        r["expr"]
        for path in RULE_FILES
        for g in yaml.safe_load(path.read_text())["groups"]
        for r in g["rules"]
    ]


def to_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, ready for Prometheus."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(exprs: list[str]) -> set[str]:
    """Names of Tandem metrics (series names as scraped, e.g. `*_bucket`, `*_total`) used."""
    return {m for e in exprs for m in _NAME.findall(e)}
