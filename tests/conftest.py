"""Shared fixtures: tiny Llama models built from configs (never downloaded), offline hub settings."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors on a 2-core machine: intra-op threads only add contention (a tiny-Llama step went from
# ~10 ms to seconds with 2 threads while another process was busy).
torch.set_num_threads(1)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import_benchmark(name: str):
    """``benchmarks/<name>.py`` (loaded from its file) or the package ``benchmarks/<name>/``, imported as when it
    runs: with ``benchmarks/`` on ``sys.path`` (the scripts share ``speed_common.py``; the packages import
    themselves by name), removed again afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        script = BENCHMARKS / f"{name}.py"
        if not (BENCHMARKS / name).is_dir():
            spec = importlib.util.spec_from_file_location(f"benchmark_{name}", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(name)


@pytest.fixture(scope="session")
def import_benchmark():
    """A benchmark by name: ``import_benchmark("peer")``, ``import_benchmark("accuracy_study")``."""
    return _import_benchmark


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


WIDE = dict(hidden_size=128, intermediate_size=256)  # every linear has >= 128 inputs


def trained_checkpoint(path, seed: int, **quant):
    """A tiny wide QAT Llama (``QuantConfig(**quant)``) trained for 4 CAGE steps (correction active, seeded),
    saved to ``path`` like the recipes; returns the model in eval mode."""
    from hf_cage import QuantConfig, create_cage_optimizer, quantize_model

    model = make_tiny_llama(seed, **WIDE)
    quantize_model(model, QuantConfig(**quant))
    optimizer = create_cage_optimizer(model, lr=3e-3, cage_lambda=10.0, cage_silence_ratio=0.0, total_steps=4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(4):
        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 16), generator=generator)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
