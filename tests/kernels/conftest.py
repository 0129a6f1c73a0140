"""Kernel tests: on a host without CUDA, every Triton kernel runs on CPU through the Triton
interpreter. Triton decides interpreted-or-compiled when a kernel is decorated, so the variable
is set here, at import time, before any test module imports `engine.kernels`. (If another test
directory imports `engine.kernels` first in the same session, the launchers raise a clear
ValueError; the root conftest should set it too.)"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
