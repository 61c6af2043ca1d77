"""Backend dispatch: HF_CAGE_BACKEND parsing, auto -> torch on CPU, no silent fallback, import hygiene."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from hf_cage import QATLinear, QuantConfig, kernels
from hf_cage.kernels import BACKEND_ENV, QuantSpec, backend_for, dispatch


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "auto"), ("", "auto"), ("auto", "auto"), (" Torch ", "torch"), ("TRITON", "triton")]
)
def test_backend_env_parsing(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    else:
        monkeypatch.setenv(BACKEND_ENV, value)
    assert dispatch.requested_backend() == expected


def test_bad_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=r"HF_CAGE_BACKEND='cuda' is not supported; choose one of \('auto', 'torch'"):
        backend_for(torch.zeros(1))


def test_auto_picks_torch_for_cpu_tensors_and_forcing_wins(monkeypatch):
    x = torch.zeros(2, 8)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert backend_for(x) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert backend_for(x) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert backend_for(x) == "triton"


def test_auto_cpu_path_is_the_torch_twin(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "auto")
    spec = QuantSpec(4, hadamard_block=32)
    x = torch.randn(5, 64)
    codes, scales = kernels.quantize_rows(x, spec)
    ref_codes, ref_scales = kernels.reference.quantize_rows(x, spec)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    layer = QATLinear.from_linear(nn.Linear(64, 16), QuantConfig())
    assert not layer.uses_int4_matmul(x)


def test_forcing_triton_without_triton_installed_is_an_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        backend_for(torch.zeros(1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the non-interpreted process")
def test_forcing_triton_on_cpu_without_the_interpreter_raises_instead_of_falling_back(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.quantize_rows(torch.randn(4, 64), QuantSpec(4))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        QATLinear.from_linear(nn.Linear(64, 16), QuantConfig())(torch.randn(4, 64))


IMPORT_CHECK = """
import sys
import torch, transformers
triton_before = "triton" in sys.modules
before = set(sys.modules)
import hf_cage
new = set(sys.modules) - before
own = sorted(m for m in new if m.startswith("hf_cage.kernels.triton"))
assert not own, f"import hf_cage loaded {own}"
assert triton_before or "triton" not in sys.modules, "import hf_cage imported triton"
print("ok", triton_before)
"""


def test_import_hf_cage_loads_no_triton_module():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
