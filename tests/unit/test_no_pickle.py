"""No network-facing module deserializes with pickle (issue 21, item 7).

Walked with `ast` (no import): every first-party module under the packages that read bytes
from a socket, a gRPC call, an HTTP body, shared memory or a torch.distributed message, and the
product layer that launches them: `router` (both front doors), `kvtransfer` (handles, gRPC
stream, p2p, tiers), `tandem` (with `tandem.contract`, `tandem.pool` and the generated
`tandem.api`), `prefill_worker`, `decode_worker` and `engine.executor` (the leader -> follower
step channel). Banned: importing `pickle`, `cPickle`, `_pickle`, `cloudpickle`, `dill` or
`marshal` (any form), `ray.cloudpickle`, `pickle.load(s)`/`marshal.load(s)` calls,
`torch.load(...)` without `weights_only=True`, and `numpy.load(..., allow_pickle=True)`.

Ray's own actor calls (`tandem.actors`, `tandem.router_actor`, `.remote(...)`) serialize their
arguments with cloudpickle inside Ray: that is Ray's control plane between processes of one
cluster that Ray itself authenticates, not a Tandem wire format, and it is out of scope here.
What Tandem puts on its own wires (protobuf, JSON, raw int64 words, checksummed KV bytes) must
never be unpickled.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NETWORK_PACKAGES = (
    "router",
    "kvtransfer",
    "tandem",  # tandem.api, tandem.contract, tandem.pool and the product layer
    "prefill_worker",
    "decode_worker",
    "engine/executor",
)
BANNED_MODULES = frozenset({"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal"})
BANNED_CALLS = frozenset(
    {
        "pickle.load",
        "pickle.loads",
        "cloudpickle.load",
        "cloudpickle.loads",
        "marshal.load",
        "marshal.loads",
        "ray.cloudpickle.loads",
        "ray.cloudpickle.load",
    }
)


def _dotted(node: ast.expr) -> str:
    """ "a.b.c" for an attribute chain on a name, "" for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value
        for kw in call.keywords
    )


def _import_problems(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return [
        f"imports {name}"
        for name in names
        if name.split(".")[0] in BANNED_MODULES or name.startswith("ray.cloudpickle")
    ]


def _call_problem(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    if name in BANNED_CALLS or name.startswith("ray.cloudpickle"):
        return f"calls {name}"
    if name == "torch.load" and not _keyword_is(call, "weights_only", True):
        return "calls torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and _keyword_is(call, "allow_pickle", True):
        return f"calls {name} with allow_pickle=True"
    return None


def pickle_problems(source: str) -> list[str]:
    """Each banned import or call in `source`, as "line N: what"."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        found: list[str] = []
        if isinstance(node, ast.Import | ast.ImportFrom):
            found = _import_problems(node)
        elif isinstance(node, ast.Call):
            problem = _call_problem(node)
            found = [] if problem is None else [problem]
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith("ray.cloudpickle"):
            found = [f"uses {_dotted(node)}"]
        problems += [f"line {getattr(node, 'lineno', 0)}: {what}" for what in found]
    return problems


def network_modules() -> list[Path]:
    return sorted(p for pkg in NETWORK_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_walk_sees_every_network_layer() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in network_modules()}
    for expected in (
        "router/server.py",
        "router/http/schemas.py",
        "kvtransfer/handle.py",
        "kvtransfer/transports/grpc_stream.py",
        "tandem/api/generation_pb2.py",
        "tandem/contract/worker_api.py",
        "tandem/pool/core.py",
        "engine/executor/step_channel.py",
        "decode_worker/worker.py",
    ):
        assert expected in names


def test_no_network_module_unpickles() -> None:
    bad = {
        p.relative_to(ROOT).as_posix(): problems
        for p in network_modules()
        if (problems := pickle_problems(p.read_text(encoding="utf-8")))
    }
    assert not bad, f"pickle-family deserialization on a network path: {bad}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "import _pickle",
        "from ray import cloudpickle",
        "import ray.cloudpickle",
        "x = ray.cloudpickle.dumps(y)",
        "obj = pickle.loads(data)",
        "obj = marshal.loads(data)",
        "t = torch.load(path)",
        "t = torch.load(path, weights_only=False)",
        "a = np.load(path, allow_pickle=True)",
        "a = numpy.load(path, allow_pickle=True)",
        "def f(data):\n    import pickle\n    return pickle.loads(data)",
    ],
)
def test_the_check_catches_each_banned_form(snippet: str) -> None:
    assert pickle_problems(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "t = torch.load(path, weights_only=True)",
        "a = np.load(path)",
        "a = np.load(path, allow_pickle=False)",
        "msg.ParseFromString(data)",
        "import json\njson.loads(data)",
        "loads = 1",
    ],
)
def test_the_check_passes_safe_forms(snippet: str) -> None:
    assert not pickle_problems(snippet), snippet
