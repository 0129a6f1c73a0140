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

Token authentication: Ray 2.60 turns it on for every new local instance, and warns that it did,
whenever `RAY_AUTH_MODE` is unset (`enable_token_auth_by_default` in
`ray._private.authentication.authentication_token_setup`; the token goes to ~/.ray/auth_token).
`use_token_auth()` keeps it on by saying so (`RAY_AUTH_MODE=token`), which is what silences the
warning; a mode the user set is left alone.

Worker output stays forwarded to the driver (Ray's `log_to_driver`): a worker's warning or
traceback is what a user needs to see. Ray forwards every line, blank ones too, so the workers
print none: progress bars come from `engine.progress`, which draws only on a terminal.
"""

from __future__ import annotations

import os
import sys

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE = "RAY_AUTH_MODE"


def bind_ray_to_loopback() -> None:
    """Make Ray instances started from now on (by this process) listen on 127.0.0.1 only."""
    os.environ[LOOPBACK_SWITCH] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def use_token_auth() -> None:
    """Start Ray instances (from this process) with token authentication, unless the user chose
    a mode. Only for a new instance: joining one started without tokens would then fail."""
    if AUTH_MODE in os.environ:
        return
    os.environ[AUTH_MODE] = "token"
    if "ray" in sys.modules:
        from ray._raylet import Config  # type: ignore[attr-defined]  # not in Ray's stub

        Config.initialize("")  # Ray read the mode at import: re-read it, as Ray itself does


def start_local_ray() -> bool:
    """Join the Ray instance this process already uses or `RAY_ADDRESS` names, or start a local
    one on loopback. Returns True when this call connected (so the caller shuts Ray down)."""
    import ray

    from engine.executor.ray_launch import ensure_ray

    if ray.is_initialized():
        return False
    if not os.environ.get("RAY_ADDRESS"):
        bind_ray_to_loopback()
        use_token_auth()
    ensure_ray()
    return True
