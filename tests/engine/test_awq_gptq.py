"""AWQ and GPTQ checkpoints served as stored (engine.quant.awq_gptq): tiny checkpoints written
here from a float model, packed exactly as each format documents, load into the W4A16 layout
with dequantized weights equal to the format's own formula bit for bit, each TP rank holding
TP = 1's slices; greedy tokens equal the float model with those weights; unsupported variants
fail at start-up naming their quantization_config field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.errors import EngineConfigError, ModelLoadError
from engine.kernels.w4a16 import dequantize_int4
from engine.quant.names import resolve_quantization
from tests.engine.test_quant_engine import _generate
from tests.engine.test_quant_loading import build_float, load

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds column 8c + order[i]
GROUP = {"gptq": 128, "awq": 64}  # 128: o_proj's 128 columns a rank at TP 2 hold one group


# ---- the test's own quantizer and packers (independent of engine.quant) ----


def _quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of input columns: (q [K, N], z [K // G, N] in 0..15,
    scales [K // G, N] float16) in the formats' orientation (w is [N, K])."""
    n, k = w.shape
    groups = w.t().reshape(k // group, group, n)
    lo, hi = groups.amin(1), groups.amax(1)
    scales = ((hi - lo) / 15).clamp(min=1e-4).half()
    z = torch.round(-lo / scales.float()).clamp(0, 15)
    q = torch.round(groups / scales.float()[:, None] + z[:, None]).clamp(0, 15)
    return q.reshape(k, n).int(), z.int(), scales


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """int32 words from [..., 8] values 0..15: value i in bits 4i..4i+3."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (nibbles.to(torch.int64) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 of int32 words (nibble i last)."""
    return (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF


def pack_gptq(q: torch.Tensor, z: torch.Tensor, v1: bool = True) -> dict[str, torch.Tensor]:
    """qweight [K // 8, N]: word [j, n] nibble i = q[8j + i, n] (packed along K);
    qzeros [K // G, N // 8]: word [g, c] nibble i = z[g, 8c + i] (packed along N), v1 storing
    z - 1 (a zero point of 0 is stored as 15, read back as 16)."""
    k, n = q.shape
    qweight = _words(q.reshape(k // 8, 8, n).permute(0, 2, 1))
    stored = ((z - 1) if v1 else z) & 0xF
    qzeros = _words(stored.reshape(z.shape[0], n // 8, 8))
    return {"qweight": qweight, "qzeros": qzeros}


def pack_awq(q: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """qweight [K, N // 8] and qzeros [K // G, N // 8], both packed along N: word [r, c]
    nibble i = value [r, 8c + AWQ_ORDER[i]]."""
    order = torch.tensor(AWQ_ORDER)

    def pack(v: torch.Tensor) -> torch.Tensor:
        return _words(v.reshape(v.shape[0], -1, 8)[..., order])

    return {"qweight": pack(q), "qzeros": pack(z)}


def dequant_gptq(t: dict[str, torch.Tensor], v1: bool = True) -> torch.Tensor:
    """The GPTQ formula, w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n], as [N, K]."""
    q = _nibbles(t["qweight"]).permute(0, 2, 1).reshape(-1, t["qweight"].shape[1])
    z = _nibbles(t["qzeros"]).reshape(t["qzeros"].shape[0], -1) + (1 if v1 else 0)
    g = t["g_idx"].long()
    return ((q - z[g]).float() * t["scales"].float()[g]).t().contiguous()


def dequant_awq(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """The AWQ formula with its interleaved nibbles put back in column order, as [N, K]."""
    reverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])

    def unpack(words: torch.Tensor) -> torch.Tensor:
        return _nibbles(words)[..., reverse].reshape(words.shape[0], -1)

    q, z = unpack(t["qweight"]), unpack(t["qzeros"])
    z, s = z.repeat_interleave(group, 0), t["scales"].float().repeat_interleave(group, 0)
    return ((q - z).float() * s).t().contiguous()


def _quant_config(method: str) -> dict:
    if method == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP["gptq"],
            "desc_act": False,
            "sym": False,
            "checkpoint_format": "gptq",
        }
    return {"quant_method": "awq", "bits": 4, "group_size": GROUP["awq"], "version": "gemm"}


def build_packed(root: Path, method: str) -> tuple[Path, Path]:
    """(the float checkpoint's linears packed as `method`, the same model with those layers'
    weights dequantized by the format's formula, float32)."""
    src = build_float(root)
    path, deq_path = root / f"llama_{method}", root / f"llama_{method}_dequantized"
    if (path / "config.json").is_file():
        return path, deq_path
    group = GROUP[method]
    packed: dict[str, torch.Tensor] = {}
    floats = load_file(str(src / "model.safetensors"))
    for name, value in list(floats.items()):
        if not name.endswith(tuple(f"{p}.weight" for p in _LINEARS)):
            packed[name] = value
            continue
        base = name.removesuffix(".weight")
        q, z, scales = _quantize(value, group)
        if method == "gptq":
            layer = pack_gptq(q, z) | {"scales": scales}
            layer["g_idx"] = torch.arange(q.shape[0], dtype=torch.int32) // group
            floats[name] = dequant_gptq(layer)
        else:
            layer = pack_awq(q, z) | {"scales": scales}
            floats[name] = dequant_awq(layer, group)
        packed |= {f"{base}.{part}": t for part, t in layer.items()}
    config = json.loads((src / "config.json").read_text())
    for out, tensors, qc in ((path, packed, _quant_config(method)), (deq_path, floats, None)):
        shutil.copytree(src, out)
        save_file(tensors, str(out / "model.safetensors"))
        (out / "config.json").write_text(
            json.dumps(config | ({"quantization_config": qc} if qc else {}))
        )
    return path, deq_path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("awq_gptq")


@pytest.fixture(scope="module", params=["gptq", "awq"])
def ckpt(request, root) -> tuple[str, Path, Path]:
    return (request.param, *build_packed(root, request.param))


_LAYERS = (
    "model.layers.0.self_attn.qkv_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.0.mlp.gate_up_proj",
    "model.layers.1.mlp.down_proj",
)


def _dequantized(model: torch.nn.Module, layer: str) -> torch.Tensor:
    module = model.get_submodule(layer)
    slots = [module.slot(n) for n in ("qweight", "scales", "mins")]
    return dequantize_int4(*slots, module.group_size)


def test_repacked_layers_equal_the_format_formula(ckpt):
    method, path, deq_path = ckpt
    model, reference = load(path, None), load(deq_path, None)
    for layer in _LAYERS:
        module = model.get_submodule(layer)
        assert module.method.name == method and module.group_size == GROUP[method]
        assert module.slot("qweight").dtype == torch.int32
        want = reference.get_submodule(layer).slot("weight")
        assert torch.equal(_dequantized(model, layer), want), layer


def test_tp2_shards_are_the_tp1_slices(ckpt):
    """Rows of the column-parallel layers, whole groups of the row-parallel ones' columns."""
    _, path, _ = ckpt
    full = {layer: _dequantized(load(path, None), layer) for layer in _LAYERS}
    q, kv, inter = 256, 128, 512
    for rank in (0, 1):
        shard = load(path, None, rank, 2)
        rows = {
            _LAYERS[0]: torch.cat([_half(rank, q), _half(rank, kv, q), _half(rank, kv, q + kv)]),
            _LAYERS[2]: torch.cat([_half(rank, inter), _half(rank, inter, inter)]),
        }
        for layer, whole in full.items():
            mine = _dequantized(shard, layer)
            if layer in rows:
                assert torch.equal(mine, whole[rows[layer]]), layer
            else:
                cols = whole.shape[1] // 2
                assert torch.equal(mine, whole[:, rank * cols : (rank + 1) * cols]), layer


def _half(rank: int, n: int, offset: int = 0) -> torch.Tensor:
    """The TP = 1 rows rank `rank` of 2 holds of a shard of `n` rows starting at `offset`."""
    return torch.arange(rank * n // 2, (rank + 1) * n // 2) + offset


def test_greedy_tokens_equal_the_dequantized_float_model(ckpt):
    method, path, deq_path = ckpt
    tokens, methods, _ = _generate(path, dtype="float32")
    want, float_methods, _ = _generate(deq_path, dtype="float32")
    assert methods == {method} and float_methods == {"unquantized"}
    assert tokens == want


def test_a_gptq_v2_checkpoint_stores_zeros_as_they_are():
    q = torch.randint(0, 16, (256, 16), dtype=torch.int32)
    z = torch.randint(0, 16, (2, 16), dtype=torch.int32)
    layer = pack_gptq(q, z, v1=False) | {"scales": torch.rand(2, 16).half() + 0.01}
    layer["g_idx"] = torch.arange(256, dtype=torch.int32) // 128
    from engine.quant.awq_gptq import PackedFormat, PackedRows, repack

    fmt = PackedFormat.from_config(_quant_config("gptq") | {"checkpoint_format": "gptq_v2"})
    rows = PackedRows(
        layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], (16, 256), 0
    )
    packed = repack(rows, fmt, torch.device("cpu"), torch.float32)
    assert fmt.zero_offset == 0
    assert torch.equal(dequantize_int4(*packed, 128), dequant_gptq(layer, v1=False))


def test_a_layer_left_in_float_stays_unquantized(ckpt, tmp_path):
    """AWQ's modules_to_not_convert: a layer whose checkpoint holds a float `weight`."""
    method, path, deq_path = ckpt
    mixed = tmp_path / "mixed"
    shutil.copytree(path, mixed)
    tensors = load_file(str(mixed / "model.safetensors"))
    base = "model.layers.1.mlp.down_proj"
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        tensors.pop(f"{base}.{part}", None)
    tensors[f"{base}.weight"] = load_file(str(deq_path / "model.safetensors"))[f"{base}.weight"]
    save_file(tensors, str(mixed / "model.safetensors"))
    model = load(mixed, None)
    assert model.get_submodule(base).method.name == "unquantized"
    assert model.get_submodule("model.layers.0.mlp.down_proj").method.name == method


def test_act_order_g_idx_is_refused_naming_desc_act(ckpt, tmp_path):
    method, path, _ = ckpt
    if method != "gptq":
        pytest.skip("g_idx is GPTQ's")
    bad = tmp_path / "act_order"
    shutil.copytree(path, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="desc_act"):
        load(bad, None)


@pytest.mark.parametrize(
    "method, change, field",
    [
        ("gptq", {"bits": 8}, "bits"),
        ("awq", {"bits": 3}, "bits"),
        ("gptq", {"group_size": -1}, "group_size"),
        ("awq", {"version": "gemv"}, "version"),
        ("awq", {"version": None, "format": "exllama"}, "version"),
        ("awq", {"zero_point": False}, "zero_point"),
        ("gptq", {"desc_act": True}, "desc_act"),
        ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format"),
        ("gptq", {"lm_head": True}, "lm_head"),
    ],
)
def test_unsupported_variants_name_their_field(method, change, field):
    hf = {"quantization_config": _quant_config(method) | change}
    with pytest.raises(EngineConfigError, match=rf"^quantization: .*quantization_config\.{field}"):
        resolve_quantization(None, hf)


def test_the_option_must_agree_with_the_checkpoint(ckpt):
    method, path, deq_path = ckpt
    other = "awq" if method == "gptq" else "gptq"
    assert ModelConfig.from_path(path, "float32", method).quantized_checkpoint
    for option in (other, "int4", "fp8"):
        with pytest.raises(EngineConfigError, match=f"^quantization: '{option}' contradicts"):
            ModelConfig.from_path(path, "float32", option)
    with pytest.raises(EngineConfigError, match=f"^quantization: '{method}' serves"):
        ModelConfig.from_path(deq_path, "float32", method)
    static = {
        "quantization_config": _quant_config("gptq") | {"desc_act": True, "static_groups": True}
    }
    assert resolve_quantization(None, static) == ("gptq", True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serves_packed_checkpoints_through_the_kernel(ckpt):
    """On CUDA: float16 scales and mins (mins = -z * scale rounded once: within 1/64 of a
    quantization step of the formula), the W4A16 kernel equal to its reference, and LLM
    serving the checkpoint in bfloat16 with CUDA graphs (bench/gpu_awq_gptq.sh runs this)."""
    from engine import LLM, SamplingParams
    from engine.kernels.w4a16 import w4a16_linear_ref
    from engine.layers.linear import LinearBase

    method, path, deq_path = ckpt
    reference = load(deq_path, None)  # before the engine: load() sets the TP group
    wants = {layer: reference.get_submodule(layer).slot("weight").cuda() for layer in _LAYERS}
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
    with LLM(str(path), dtype="bfloat16", show_progress=False) as llm:
        outs = llm.generate([[5, 6, 7, 8], [9, 10, 11]], params)
        model = llm.engine.runner.model
        assert llm.engine.runner.graphs is not None
        methods = {m.method.name for m in model.modules() if isinstance(m, LinearBase)}
        for layer, want in wants.items():
            module = model.get_submodule(layer)
            slots = [module.slot(n) for n in ("qweight", "scales", "mins")]
            assert slots[1].dtype == slots[2].dtype == torch.float16
            step = slots[1].float().repeat_interleave(module.group_size, 1)
            assert ((_dequantized(model, layer) - want).abs() <= step / 64).all(), layer
            for m in (1, 3, 40):
                x = torch.randn(m, want.shape[1], device="cuda", dtype=torch.bfloat16)
                ref = w4a16_linear_ref(x, *slots, module.group_size)
                torch.testing.assert_close(module(x), ref, rtol=2e-2, atol=2e-2)
    assert methods == {method}
    assert all(len(o.token_ids) == 8 for o in outs)
