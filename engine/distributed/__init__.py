"""Tensor parallelism as the layers see it: the TP group, its collectives, the fused all-reduce
+ add + RMSNorm and the pass that installs it. With `engine.executor` (the orchestration above
the runner) and kvtransfer's p2p transport, the only code that imports torch.distributed.
"""

from engine.distributed.errors import TPGroupError
from engine.distributed.parallel_state import TPGroup, get_tp_group, set_tp_group

__all__ = ["TPGroup", "TPGroupError", "get_tp_group", "set_tp_group"]
