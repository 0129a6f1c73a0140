"""Tensor parallelism: the only package that imports torch.distributed."""

from engine.distributed.parallel_state import TPGroup, get_tp_group, set_tp_group

__all__ = ["TPGroup", "get_tp_group", "set_tp_group"]
