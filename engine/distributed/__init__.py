"""Tensor parallelism: the only package that imports torch.distributed.

`parallel_state` (the group layers read) is imported eagerly; the executor, which needs Ray,
is imported only when a group of size > 1 starts (`engine.distributed.executor`).
"""

from engine.distributed.errors import TPGroupError
from engine.distributed.parallel_state import TPGroup, get_tp_group, set_tp_group

__all__ = ["TPGroup", "TPGroupError", "get_tp_group", "set_tp_group"]
