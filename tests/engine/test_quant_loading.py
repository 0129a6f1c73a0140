"""Loading quantized linears: each TP rank's shards equal the TP = 1 model's slices, Hugging Face
FP8 checkpoints load as they are, and contradictory or unsupported checkpoints fail naming
`quantization`. Also the tiny checkpoints the other quantization tests use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig, ModelConfig
from engine.distributed import TPGroup, set_tp_group
from engine.errors import EngineConfigError, ModelLoadError
from engine.models.registry import model_class
from engine.quant.fp8 import FP8, FP8_MAX, quantize_rows
from engine.weights import fill_dummy, load_safetensors

# Big enough for int4 groups of 128 in every layer at TP 2 (o_proj: 128 input columns a rank)
QUANT_SHAPE = dict(
    vocab_size=500,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.05,
    bos_token_id=1,
    eos_token_id=2,
)
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_float(root: Path) -> Path:
    """A tiny float32 Llama checkpoint (transformers' random init)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = root / "llama_quant"
    if not (path / "config.json").is_file():
        torch.manual_seed(2024)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**QUANT_SHAPE)).float().eval()
        model.save_pretrained(str(path), safe_serialization=True)
    return path


def build_fp8(root: Path, quant_method: str = "fp8") -> Path:
    """The float checkpoint as Hugging Face writes FP8 ones: each linear `weight` float8_e4m3fn
    with a `weight_scale` (per tensor for attention, per channel [N, 1] for the MLP) and a
    static `input_scale`; config.json's quantization_config says so."""
    src = build_float(root)
    path = root / f"llama_{quant_method}"
    if (path / "config.json").is_file():
        return path
    path.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for name, value in load_file(str(src / "model.safetensors")).items():
        if not name.endswith(_LINEARS_WEIGHT):
            tensors[name] = value
            continue
        base = name.removesuffix(".weight")
        if ".mlp." in name:
            q, scale = quantize_rows(value)
            tensors[base + ".weight_scale"] = scale[:, None]
        else:
            scale = (value.abs().amax() / FP8_MAX).reshape(())
            q = (value / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            tensors[base + ".weight_scale"] = scale
        tensors[name], tensors[base + ".input_scale"] = q, torch.tensor(0.01)
    save_file(tensors, str(path / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method, "activation_scheme": "static"}
    (path / "config.json").write_text(json.dumps(config))
    return path


_LINEARS_WEIGHT = tuple(f"{p}.weight" for p in _LINEARS)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> Path:
    return build_float(tmp_path_factory.mktemp("quant"))


@pytest.fixture(scope="module")
def fp8_ckpt(float_ckpt) -> Path:
    return build_fp8(float_ckpt.parent)


def load(path: Path, quantization: str | None, rank: int = 0, size: int = 1) -> torch.nn.Module:
    cfg = ModelConfig.from_path(path, "float32", quantization)
    set_tp_group(TPGroup(rank=rank, size=size))  # loading runs no collective
    try:
        model = model_class(cfg)(cfg, 64)
        load_safetensors(model, path, show_progress=False)
    finally:
        set_tp_group(TPGroup())
    return model


def _params(model: torch.nn.Module, layer: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.get_submodule(layer).named_parameters()}


def _qkv_rows(rank: int) -> torch.Tensor:
    """TP = 1 qkv rows that rank `rank` of 2 holds: 2 of 4 query heads, 1 of 2 KV heads."""
    hd, q = 64, 256
    heads = torch.arange(rank * 128, (rank + 1) * 128)
    kv = torch.arange(rank * hd, (rank + 1) * hd)
    return torch.cat([heads, q + kv, q + 128 + kv])


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_column_parallel_shards_are_the_tp1_rows(float_ckpt, quantization):
    full = load(float_ckpt, quantization)
    for rank in (0, 1):
        shard = load(float_ckpt, quantization, rank, 2)
        for layer, rows in (
            ("model.layers.1.self_attn.qkv_proj", _qkv_rows(rank)),
            ("model.layers.0.mlp.gate_up_proj", _gate_up_rows(rank)),
        ):
            mine, whole = _params(shard, layer), _params(full, layer)
            assert set(mine) == set(whole)
            for name, value in mine.items():
                assert torch.equal(value.view(torch.uint8), whole[name][rows].view(torch.uint8))


def _gate_up_rows(rank: int) -> torch.Tensor:
    return torch.cat([torch.arange(rank * 256, (rank + 1) * 256) + off for off in (0, 512)])


def test_int4_row_parallel_shards_are_the_tp1_groups(float_ckpt):
    """A shard boundary never cuts a group: each rank's words and groups are TP = 1's columns."""
    full = _params(load(float_ckpt, "int4"), "model.layers.0.mlp.down_proj")
    for rank in (0, 1):
        mine = _params(load(float_ckpt, "int4", rank, 2), "model.layers.0.mlp.down_proj")
        assert torch.equal(mine["qweight"], full["qweight"][:, rank * 32 : (rank + 1) * 32])
        for name in ("scales", "mins"):
            assert torch.equal(mine[name], full[name][:, rank * 2 : (rank + 1) * 2])


def test_fp8_row_parallel_shard_scales_its_own_columns(float_ckpt):
    weights = load_file(str(float_ckpt / "model.safetensors"))
    w = weights["model.layers.1.self_attn.o_proj.weight"]
    for rank in (0, 1):
        mine = _params(load(float_ckpt, "fp8", rank, 2), "model.layers.1.self_attn.o_proj")
        back = mine["weight"].float() * mine["weight_scale"][:, None]
        cols = w[:, rank * 128 : (rank + 1) * 128]
        assert torch.allclose(back, cols, atol=1e-12, rtol=2**-4)


def test_fp8_checkpoint_loads_as_it_is(fp8_ckpt):
    """quantization None follows config.json; weights and scales are the checkpoint's bytes,
    a per-tensor scale of q / k / v expanded to its shard's rows; input_scale is ignored."""
    cfg = ModelConfig.from_path(fp8_ckpt, "float32")
    assert cfg.quantization == "fp8" and cfg.quantized_checkpoint
    model = load(fp8_ckpt, None)
    disk = load_file(str(fp8_ckpt / "model.safetensors"))
    attn = _params(model, "model.layers.0.self_attn.qkv_proj")
    p = "model.layers.0.self_attn."
    expect = torch.cat([disk[p + f"{s}_proj.weight"] for s in "qkv"])
    assert torch.equal(attn["weight"].view(torch.uint8), expect.view(torch.uint8))
    scales = [disk[p + f"{s}_proj.weight_scale"].expand(r) for s, r in zip("qkv", (256, 128, 128))]
    assert torch.equal(attn["weight_scale"], torch.cat(scales))
    down = _params(model, "model.layers.1.mlp.down_proj")
    assert torch.equal(
        down["weight_scale"], disk["model.layers.1.mlp.down_proj.weight_scale"][:, 0]
    )


def test_fp8_checkpoint_rank_reads_its_channel_scales(fp8_ckpt):
    disk = load_file(str(fp8_ckpt / "model.safetensors"))
    scale = disk["model.layers.0.mlp.up_proj.weight_scale"][:, 0]
    for rank in (0, 1):
        gate_up = _params(load(fp8_ckpt, None, rank, 2), "model.layers.0.mlp.gate_up_proj")
        assert torch.equal(gate_up["weight_scale"][256:], scale[rank * 256 : (rank + 1) * 256])


def test_dummy_weights_quantize_on_load_even_for_an_fp8_config(fp8_ckpt):
    cfg = ModelConfig.from_path(fp8_ckpt, "float32")
    model = model_class(cfg)(cfg, 64)
    fill_dummy(model, seed=3)
    down = _params(model, "model.layers.1.mlp.down_proj")
    assert down["weight"].dtype == FP8 and bool((down["weight_scale"] < 1).all())
    assert model.lm_head.weight.dtype == torch.float32  # the head stays unquantized
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_option_contradicting_the_checkpoint_names_quantization(fp8_ckpt):
    with pytest.raises(EngineConfigError, match="^quantization: 'int4' contradicts .*'fp8'"):
        ModelConfig.from_path(fp8_ckpt, "float32", "int4")
    assert ModelConfig.from_path(fp8_ckpt, "float32", "fp8").quantized_checkpoint


def test_unsupported_checkpoint_quantization_names_quantization(fp8_ckpt, tmp_path):
    path = tmp_path / "gptq"
    shutil.copytree(fp8_ckpt, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineConfigError, match="^quantization: .*'gptq'"):
        ModelConfig.from_path(path)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineConfigError, match="^quantization: block-wise"):
        ModelConfig.from_path(path)


def test_fp8_weights_without_quantization_config_are_refused(fp8_ckpt, tmp_path):
    path = tmp_path / "unlabelled"
    shutil.copytree(fp8_ckpt, path)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    for option in (None, "fp8", "int4"):  # never read as float weights, nor silently cast
        with pytest.raises(ModelLoadError, match="unexpected tensor .*_scale"):
            load(path, option)


def test_unknown_quantization_option_names_the_field():
    with pytest.raises(
        EngineConfigError, match="^quantization: 'bitsandbytes' is not None or one of"
    ):
        EngineConfig(model="demo", quantization="bitsandbytes")
