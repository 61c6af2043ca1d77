"""The model card (``README.md``) and loss curve of an export.

The card is rendered from the Jinja template in ``model_cards/`` with huggingface_hub's
``ModelCard.from_template``; its YAML metadata comes from a ``ModelCardData``. Training details are
taken from the recipes' ``metrics.json`` and the Trainer's ``log_history`` when they exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..quant.config import QuantConfig
from .source import TrainingInfo

TEMPLATE = Path(__file__).resolve().parents[2] / "model_cards" / "hf_cage_model_card.md"
CITATION_TAGS = ["hf-cage", "cage", "qat"]


@dataclass
class CardOptions:
    """What the user tells the card about the model (all optional)."""

    repo_id: str | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    model_name: str | None = None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def training_rows(metrics: dict) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the training summary, from the keys present in ``metrics.json``."""
    rows = []
    labels = [
        ("method", "method"),
        ("w_bits", "weight bits"),
        ("a_bits", "activation bits"),
        ("max_steps", "steps"),
        ("steps", "steps"),
        ("tokens", "training tokens"),
        ("cage_lambda", "CAGE lambda"),
        ("cage_silence_ratio", "CAGE silence ratio"),
        ("eval_loss", "final eval loss"),
        ("eval_perplexity", "final eval perplexity"),
    ]
    seen = set()
    for key, label in labels:
        if key in metrics and metrics[key] is not None and label not in seen:
            seen.add(label)
            rows.append((label, _fmt(metrics[key])))
    if "eval_loss" in metrics and "eval_perplexity" not in metrics and isinstance(metrics["eval_loss"], (int, float)):
        rows.append(("final eval perplexity", _fmt(math.exp(metrics["eval_loss"]))))
    return rows


def plot_loss_curve(log_history: list[dict], path: Path) -> bool:
    """Write a PNG of training (and eval) loss against step; False when the logs hold no loss."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def build_model_card(
    config: QuantConfig,
    fmt: str,
    *,
    num_layers: int,
    dense_dtype: str,
    size_bytes: int,
    bf16_size_bytes: int,
    training: TrainingInfo,
    options: CardOptions,
    weights_only: bool = False,
    lossy: dict | None = None,
    loss_curve: str | None = None,
):
    """Render the card; returns a ``huggingface_hub.ModelCard`` (save it as ``README.md``)."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = options.base_model or training.metrics.get("base_model")
    datasets = options.datasets or ([training.metrics["dataset"]] if training.metrics.get("dataset") else [])
    bits_tag = f"int{config.w_bits}"
    scheme_tag = f"w{config.w_bits}a{config.a_bits or 16}"
    tags = [*CITATION_TAGS, bits_tag, scheme_tag, fmt]
    card_data = ModelCardData(
        library_name="transformers" if fmt == "compressed-tensors" else "hf-cage",
        base_model=base_model,
        tags=tags,
        license=options.license,
        pipeline_tag="text-generation",
        datasets=datasets or None,
        model_name=options.model_name,
    )
    if config.a_bits is None:
        activations = "not quantized (16-bit)"
    else:
        activations = f"{config.a_bits}-bit per token, {'integer' if config.quantizer == 'int' else 'mid-rise'} grid"
    activation_note = None
    if fmt == "compressed-tensors" and config.a_bits is not None:
        if weights_only:
            activation_note = (
                f"The model was trained with {config.a_bits}-bit activations; this export declares weights only, "
                "so transformers and vLLM run it as W{0}A16. `hf_cage.load_quantized` restores the trained "
                "activation quantization.".format(config.w_bits)
            )
        else:
            activation_note = (
                f"transformers and vLLM quantize activations to {config.a_bits} bits with their own dynamic "
                "per-token absmax rule, which differs from the training-time rule; `hf_cage.load_quantized` "
                "reproduces the trained activation quantization exactly."
            )
    metrics = training.metrics
    baselines = metrics.get("baselines") if isinstance(metrics.get("baselines"), dict) else {}
    name = options.model_name or (options.repo_id.split("/")[-1] if options.repo_id else "hf-cage quantized model")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=name,
        repo_id=options.repo_id or "path/to/this/export",
        format=fmt,
        w_bits=config.w_bits,
        a_bits=config.a_bits if not weights_only or fmt == "hf-cage" else None,
        weight_grid="integer" if config.quantizer == "int" else "mid-rise (QuEST)",
        granularity="per channel" if config.granularity == "channel" else "per group",
        group_size=config.group_size,
        activations=activations,
        quantizer=config.quantizer,
        hadamard=config.hadamard,
        num_layers=num_layers,
        target_modules=", ".join(config.target_modules),
        dense_dtype=dense_dtype,
        size_mb=f"{size_bytes / 1e6:.2f}",
        bf16_size_mb=f"{bf16_size_bytes / 1e6:.2f}",
        size_ratio=f"{size_bytes / bf16_size_bytes:.1%}" if bf16_size_bytes else "n/a",
        lossy={k: _fmt(v) for k, v in lossy.items()} if lossy else None,
        activation_note=activation_note,
        training=training_rows(metrics),
        baselines=[(m, _fmt(v)) for m, v in baselines.items()],
        loss_curve=loss_curve,
        base_model=base_model,
    )
