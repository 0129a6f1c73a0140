"""Cost profiles: how long a simulated worker's steps and KV transfers take. Pure; JSON on disk.

A profile describes one GPU kind serving one model shape, at each TP size it was calibrated
for. Step time of one engine step (a `SchedulerOutput`), with `n_i` new prompt tokens of
prefill chunk i starting after `c_i` cached/computed tokens, and a decode batch of `B` sequences
holding `C` context tokens in all:

    step = max(prefill_s if any prefill, decode_step_s if any decode)   (weights read once)
         + prefill_s_per_token * sum(n_i)                               (GEMMs)
         + prefill_s_per_token_pair * sum(n_i * (c_i + n_i / 2))        (causal attention)
         + decode_s_per_seq * B + decode_s_per_context_token * C        (KV reads)

A KV transfer of `b` bytes over a link takes `latency_s + b / bytes_per_s`. `sources` says where
each figure came from (a measurement, a roofline, an extrapolation): read it before trusting one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tandem.plan.errors import PlanError

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class StepCosts:
    """Costs of one worker (a TP group) of the profile's GPU kind; seconds, tokens."""

    prefill_s: float
    prefill_s_per_token: float
    prefill_s_per_token_pair: float
    decode_step_s: float
    decode_s_per_seq: float
    decode_s_per_context_token: float
    kv_capacity_tokens: int

    def step_seconds(self, new_tokens: int, token_pairs: float, batch: int, context: int) -> float:
        """One step: `new_tokens` prefill tokens with `token_pairs` attention pairs, plus a
        decode batch of `batch` sequences over `context` tokens (module docstring)."""
        fixed = max(self.prefill_s if new_tokens else 0.0, self.decode_step_s if batch else 0.0)
        return (
            fixed
            + self.prefill_s_per_token * new_tokens
            + self.prefill_s_per_token_pair * token_pairs
            + self.decode_s_per_seq * batch
            + self.decode_s_per_context_token * context
        )

    def prefill_seconds(self, num_new: int, num_cached: int = 0) -> float:
        """A prefill step of one prompt alone."""
        return self.step_seconds(num_new, num_new * (num_cached + num_new / 2), 0, 0)

    def decode_seconds(self, batch: int, context: int) -> float:
        """A decode-only step."""
        return self.step_seconds(0, 0.0, batch, context)


@dataclass(frozen=True)
class Link:
    """A KV path between a prefill and a decode worker."""

    latency_s: float
    bytes_per_s: float

    def transfer_seconds(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True)
class CostProfile:
    """One GPU kind and model shape. `tp` maps a TP size to its worker's costs."""

    name: str
    gpu: str
    model: str
    kv_bytes_per_token: int
    max_model_len: int
    tp: Mapping[int, StepCosts]
    links: Mapping[str, Link]
    block_size: int = 16
    router_s_per_request: float = 0.0
    sources: Mapping[str, str] = field(default_factory=dict)

    def costs(self, tp: int) -> StepCosts:
        if tp not in self.tp:
            raise PlanError("tp", f"profile {self.name!r} has no TP={tp}; it has {sorted(self.tp)}")
        return self.tp[tp]

    def link(self, name: str) -> Link:
        if name not in self.links:
            raise PlanError(
                "link", f"profile {self.name!r} has no link {name!r}: {sorted(self.links)}"
            )
        return self.links[name]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tp"] = {str(k): asdict(v) for k, v in self.tp.items()}
        return data


def _costs_from(data: Any, where: str) -> StepCosts:
    if not isinstance(data, Mapping):
        raise PlanError(where, "must be an object of step costs")
    names = [f.name for f in fields(StepCosts)]
    missing = [n for n in names if n not in data]
    unknown = [k for k in data if k not in names]
    if missing or unknown:
        raise PlanError(where, f"missing {missing}, unknown {unknown}")
    for n in names:
        value = data[n]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise PlanError(f"{where}.{n}", f"must be a number >= 0, got {value!r}")
    costs = StepCosts(**{n: data[n] for n in names})
    if costs.kv_capacity_tokens < 1:
        raise PlanError(f"{where}.kv_capacity_tokens", "must be >= 1")
    return StepCosts(**{**asdict(costs), "kv_capacity_tokens": int(costs.kv_capacity_tokens)})


def _links_from(data: Any) -> dict[str, Link]:
    if not isinstance(data, Mapping) or not data:
        raise PlanError("links", "must be a non-empty object of {latency_s, bytes_per_s}")
    links = {}
    for name, link in data.items():
        try:
            links[name] = Link(float(link["latency_s"]), float(link["bytes_per_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"links.{name}", f"needs latency_s and bytes_per_s ({exc})") from None
        if links[name].bytes_per_s <= 0 or links[name].latency_s < 0:
            raise PlanError(f"links.{name}", "bytes_per_s must be > 0 and latency_s >= 0")
    return links


def profile_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> CostProfile:
    """Validate a profile's JSON object. Raises PlanError naming the field."""
    try:
        tp_raw = data["tp"]
        if not isinstance(tp_raw, Mapping) or not tp_raw:
            raise PlanError("tp", "must map TP sizes to step costs")
        tp = {int(k): _costs_from(v, f"tp.{k}") for k, v in tp_raw.items()}
        return CostProfile(
            name=str(data["name"]),
            gpu=str(data["gpu"]),
            model=str(data["model"]),
            kv_bytes_per_token=int(data["kv_bytes_per_token"]),
            max_model_len=int(data["max_model_len"]),
            tp=tp,
            links=_links_from(data["links"]),
            block_size=int(data.get("block_size", 16)),
            router_s_per_request=float(data.get("router_s_per_request", 0.0)),
            sources=dict(data.get("sources", {})),
        )
    except KeyError as exc:
        raise PlanError(str(exc.args[0]), f"missing from profile {source}") from None
    except ValueError as exc:
        if isinstance(exc, PlanError):
            raise
        raise PlanError("profile", f"{source}: {exc}") from None


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> CostProfile:
    """A shipped profile by name (`h100-llama3-8b`) or a JSON file. Raises PlanError."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise PlanError(
            "profile",
            f"{str(name_or_path)!r} is no file and no shipped profile {shipped_profiles()}",
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError("profile", f"{path} is not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise PlanError("profile", f"{path} must hold a JSON object")
    return profile_from_dict(data, str(path))


def save_profile(profile: CostProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
