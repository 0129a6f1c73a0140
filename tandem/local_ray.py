"""A local Ray instance bound to 127.0.0.1, for `tandem serve`, `make demo` and the tests.

Why: on Linux, Ray 2.60 resolves "127.0.0.1" given as a node IP (`ray.init(_node_ip_address=)`,
`ray start --node-ip-address`) to the machine's outward address, so a local instance's GCS and
raylets listen on the network, unauthenticated. Ray keeps loopback only when it believes
multi-node clusters are off: the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` switch (read once, at
`import ray`, into `ray._private.ray_constants.ENABLE_RAY_CLUSTER`). `bind_ray_to_loopback()`
sets both the variable (inherited by every Ray process started afterwards) and, when Ray is
already imported, the constant. Hazard: in that mode `ray start --address=...` refuses to add
worker nodes, so call it only for single-machine instances (`ray.cluster_utils.Cluster` still
adds simulated nodes, which the multi-node tests rely on).
"""

from __future__ import annotations

import os
import sys

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def bind_ray_to_loopback() -> None:
    """Make Ray instances started from now on (by this process) listen on 127.0.0.1 only."""
    os.environ[LOOPBACK_SWITCH] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray() -> bool:
    """Join the Ray instance this process already uses or `RAY_ADDRESS` names, or start a local
    one on loopback. Returns True when this call connected (so the caller shuts Ray down)."""
    import ray

    from engine.distributed.ray_launch import ensure_ray

    if ray.is_initialized():
        return False
    if not os.environ.get("RAY_ADDRESS"):
        bind_ray_to_loopback()
    ensure_ray()
    return True
