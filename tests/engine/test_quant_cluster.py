"""A pool's quantization reaches its workers' EngineConfig: the cluster spec's `engine` knobs and
`tandem serve --quantization` (pure: no Ray, no model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import EngineConfig
from tandem.spec import parse_spec
from tandem.spec_errors import SpecError

SPEC = Path(__file__).resolve().parents[2] / "deploy" / "tandem.yaml"


def _spec(decode_engine: dict[str, Any]) -> Any:
    data = yaml.safe_load(SPEC.read_text())
    data["pools"]["decode"]["engine"].update(decode_engine)
    return parse_spec(data, "test.yaml")


def test_pool_quantization_reaches_the_engine_config():
    spec = _spec({"quantization": "int4"})
    assert spec.pools.decode is not None and spec.pools.prefill is not None
    kwargs = spec.pools.decode.engine_kwargs(spec.model)
    assert EngineConfig(**kwargs).quantization == "int4"
    assert spec.pools.prefill.engine_kwargs(spec.model)["quantization"] is None  # per pool


def test_bad_pool_quantization_names_the_field():
    with pytest.raises(SpecError) as info:
        _spec({"quantization": "int3"})
    assert info.value.field == "pools.decode.engine.quantization"


def test_serve_flag_reaches_every_worker(monkeypatch):
    from typer.testing import CliRunner

    import tandem.serve
    from tandem.cli import app

    seen: list[Any] = []
    monkeypatch.setattr(tandem.serve, "serve", lambda options, say: seen.append(options))
    args = ["serve", "--model", "tiny-random", "--device", "cpu", "--quantization", "fp8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = tandem.serve.serve_config(seen[0], num_gpus=0)
    assert config.engine_kwargs["quantization"] == "fp8"
    bad = CliRunner().invoke(app, [*args[:-1], "int3"])
    assert bad.exit_code != 0 and "quantization" in bad.output
