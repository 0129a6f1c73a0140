"""The HTTP port from each place a cluster is configured (pure: no Ray, no server): `tandem
serve`'s flags, the cluster spec, RouterConfig, and what `tandem serve` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from router.config import RouterConfig, RouterConfigError
from tandem.cli import app
from tandem.serve import ServeOptions, serve_config, serving_banner
from tandem.spec import parse_spec
from tandem.spec_errors import SpecError

REPO = Path(__file__).resolve().parents[2]


def _spec(**router: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "tandem.yaml").read_text())
    data.setdefault("router", {}).update(router)
    return data


def test_serve_serves_http_on_8000_unless_told_otherwise() -> None:
    assert serve_config(ServeOptions(device="cpu"), num_gpus=0).http_port == 8000
    assert serve_config(ServeOptions(device="cpu", http_port=0), num_gpus=0).http_port == 0
    assert serve_config(ServeOptions(device="cpu", http_port=None), num_gpus=0).http_port is None


def test_serve_help_names_the_http_flags() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "120"})
    assert "--http-port" in result.output and "--no-http" in result.output


def test_the_banner_prints_the_http_address_beside_the_grpc_one() -> None:
    lines = serving_banner("demo", "127.0.0.1:50051", {"p0": "prefill"}, "http://127.0.0.1:8000")
    assert lines[0] == "Tandem is serving at 127.0.0.1:50051"
    assert "  OpenAI API: http://127.0.0.1:8000/v1" in lines
    assert not any("OpenAI" in line for line in serving_banner("demo", "a:1", {}))


def test_the_spec_takes_an_http_port_distinct_from_the_others() -> None:
    assert parse_spec(_spec()).router.http_port is None
    assert parse_spec(_spec(http_port=8000)).router.http_port == 8000
    with pytest.raises(SpecError) as clash:
        parse_spec(_spec(port=8000, http_port=8000))
    assert "router.http_port" in str(clash.value)
    with pytest.raises(SpecError) as bad:
        parse_spec(_spec(http_port=0))
    assert "router.http_port" in str(bad.value)


def test_router_config_checks_the_http_port() -> None:
    assert RouterConfig(max_model_len=16, http_port=0).http_port == 0
    with pytest.raises(RouterConfigError) as bad:
        RouterConfig(max_model_len=16, http_port=70000)
    assert bad.value.field == "http_port"
