"""The sparse (mixture-of-experts) MLP block: Mixtral, Qwen2-MoE, Qwen3-MoE.

Design. A router (a replicated [E, H] linear) scores every token; the top k experts by
softmax probability (float32) are kept, renormalised to sum to 1 where the architecture does
(`MoEConfig.renormalize`). Each layer stores its experts stacked: `experts.gate_up_proj`
[E, 2*I, H] (rows [gate | up], as transformers 5 holds them) and `experts.down_proj` [E, H, I];
the per-expert checkpoint tensors (`experts.{e}.gate_proj` / `w1`, ...) load into their
expert's rows through the parameters' `weight_loader` with shard id (e, 0 | 1) or e, and a
checkpoint that already stacks them (transformers 5's names) loads whole (shard id None).

The expert computation has two implementations with one contract (`fused_experts`):
`fused_experts_ref` (torch; a loop over the experts that received tokens, their weighted
outputs summed back with index_add; it syncs with the host, so it is CPU- and reference-only)
and on CUDA the fused Triton kernel (engine.kernels.fused_moe: tokens sorted by expert, two
grouped GEMMs, no host sync, so CUDA graphs capture it). Qwen2-MoE adds a dense shared expert
scaled by sigmoid(shared_expert_gate(x)).

Hazards. Expert parallelism does not exist yet and the experts do not shard over TP: the block
refuses tensor_parallel_size > 1 when built. The router and the shared expert's gate are plain
parameters (never quantized); config refuses quantization of MoE models altogether.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, MoEConfig
from engine.distributed import get_tp_group
from engine.errors import EngineConfigError
from engine.layers.activation import silu_and_mul, silu_and_mul_ref
from engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from engine.layers.weight_source import WeightSource, copy_into, read_all

ShardSource = torch.Tensor | WeightSource


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64) from router logits [T, E]: softmax
    over all experts in float32, the top k kept (largest first), renormalised if asked."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j].

    x [T, H]; w13 [E, 2I, H] ([gate | up] rows); w2 [E, H, I]; topk_weights [T, k] (any float
    dtype; applied in float32 and rounded to x's dtype per expert, as transformers does);
    topk_ids [T, k] integer in [0, E). Returns [T, H] in x's dtype. Experts that received no
    token are skipped. Reads the per-expert counts on the host (a sync): not for CUDA graphs.
    """
    top_k = topk_ids.shape[1]
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten()
    flat_weights = topk_weights.flatten().float()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start : start + count]
        start += count
        tokens = slots // top_k
        hidden = silu_and_mul_ref(F.linear(x[tokens], w13[expert]))
        y = F.linear(hidden, w2[expert]).float() * flat_weights[slots, None]
        out.index_add_(0, tokens, y.to(x.dtype))
    return out


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """`fused_experts_ref`'s contract: the Triton kernel on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        from engine.kernels.fused_moe import fused_moe

        return fused_moe(x, w13, w2, topk_weights, topk_ids)
    return fused_experts_ref(x, w13, w2, topk_weights, topk_ids)


class ReplicatedLinear(nn.Module):
    """y = x W^T, W [out, in] whole on every rank; a plain parameter the quantization pass
    leaves alone (routers and gates are small and precision-sensitive)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class StackedExperts(nn.Module):
    """Every expert's gate | up [E, 2I, H] and down [E, H, I] weights, one tensor each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        shape13 = (num_experts, 2 * intermediate_size, hidden_size)
        self.gate_up_proj = nn.Parameter(torch.empty(shape13), requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )
        self.gate_up_proj.weight_loader = self._load_gate_up  # type: ignore[attr-defined]
        self.down_proj.weight_loader = self._load_down  # type: ignore[attr-defined]

    def _load_gate_up(self, param: nn.Parameter, src: ShardSource, shard_id: object) -> None:
        """shard_id None: the stacked [E, 2I, H] tensor; (e, 0) expert e's gate, (e, 1) its up."""
        if shard_id is None:
            copy_into(param, read_all(src), "experts.gate_up_proj")
            return
        assert isinstance(shard_id, tuple), shard_id
        expert, half = shard_id
        inter = self.intermediate_size
        dst = param.data[expert].narrow(0, half * inter, inter)
        copy_into(dst, read_all(src), f"experts.{expert}.{('gate', 'up')[half]}_proj")

    def _load_down(self, param: nn.Parameter, src: ShardSource, shard_id: object) -> None:
        """shard_id None: the stacked [E, H, I] tensor; e: expert e's down projection."""
        if shard_id is None:
            copy_into(param, read_all(src), "experts.down_proj")
            return
        assert isinstance(shard_id, int), shard_id
        copy_into(param.data[shard_id], read_all(src), f"experts.{shard_id}.down_proj")

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SharedExpert(nn.Module):
    """Qwen2-MoE's dense expert every token passes through (a SiLU-gated MLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """The MLP of one MoE decoder layer: x [T, H] -> [T, H] (module names follow the
    checkpoints': `gate` is the router, `experts`, `shared_expert`, `shared_expert_gate`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None, "SparseMoeBlock needs ModelConfig.moe"
        check_no_tensor_parallel(cfg.architecture)
        moe: MoEConfig = cfg.moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = ReplicatedLinear(cfg.hidden_size, moe.num_experts)
        self.experts = StackedExperts(moe.num_experts, cfg.hidden_size, moe.intermediate_size)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if moe.shared_expert_intermediate_size:
            shared = moe.shared_expert_intermediate_size
            self.shared_expert = SharedExpert(cfg.hidden_size, shared)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def check_no_tensor_parallel(architecture: str) -> None:
    """MoE layers run whole on one rank until expert parallelism exists: refuse a TP group."""
    tp_size = get_tp_group().size
    if tp_size > 1:
        raise EngineConfigError(
            f"tensor_parallel_size: {tp_size} is not supported for the mixture-of-experts model "
            f"{architecture} (its experts do not shard yet; use tensor_parallel_size=1)"
        )
