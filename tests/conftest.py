"""Shared test set-up: a private cache directory for built models, and the gpu marker's skip."""

from __future__ import annotations

import os

import pytest

try:  # Triton picks interpreted or compiled at import: decide before anything imports it
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
os.environ.setdefault(
    "TANDEM_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "tandem")
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    gpus = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
