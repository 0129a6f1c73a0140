"""The TP fixtures every module here may request: a local Ray instance, tiny checkpoints."""

from tests.distributed.tp_fixtures import checkpoints, local_ray

__all__ = ["checkpoints", "local_ray"]
