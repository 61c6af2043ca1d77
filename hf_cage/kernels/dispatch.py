"""The seam between hf-cage's maths and its kernels: Triton on CUDA, the torch twins elsewhere.

``HF_CAGE_BACKEND`` picks the backend: ``auto`` (default: Triton for CUDA tensors when triton
is installed, torch otherwise), ``torch`` or ``triton``. Forcing ``triton`` on CPU tensors runs
the real kernels, which only works under ``TRITON_INTERPRET=1``; it never falls back silently.
Triton modules are imported here lazily, on first use, never at ``import hf_cage``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKEND_ENV = "HF_CAGE_BACKEND"
BACKENDS = ("auto", "torch", "triton")


def requested_backend() -> str:
    backend = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensors``, honouring ``HF_CAGE_BACKEND``."""
    backend = requested_backend()
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed; pip install triton")
        return "triton"
    if backend == "auto" and all(t.is_cuda for t in tensors) and triton_available():
        return "triton"
    return "torch"


def triton_module(name: str):
    """Import ``hf_cage.kernels.<name>`` (a Triton module) on first use."""
    return importlib.import_module(f"hf_cage.kernels.{name}")
