"""The model card (``README.md``) and loss curve of an export.

The card is rendered from the Jinja template ``hf_cage/export/templates/model_card.md`` (package data,
read with ``importlib.resources``) by huggingface_hub's ``ModelCard.from_template``; its YAML metadata
comes from a ``ModelCardData``. What each format says about serving comes from the format object
(:mod:`hf_cage.export.formats`); training details from :class:`~hf_cage.export.source.TrainingInfo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources

from ..plots import plot_loss_curve  # noqa: F401 (re-exported: export/api.py writes the export's curve)
from ..quant.config import QuantConfig
from .formats import Conversion, ExportFormat
from .source import TrainingInfo

TEMPLATE = ("templates", "model_card.md")  # package data of hf_cage.export
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
        ("steps", "steps"),
        ("max_steps", "steps"),
        ("tokens", "training tokens"),
        ("cage_lambda", "CAGE lambda"),
        ("cage_silence_ratio", "CAGE silence ratio"),
        ("train_loss", "train loss"),
        ("eval_loss", "eval loss"),
        ("eval_perplexity", "eval perplexity"),
    ]
    seen = set()
    for key, label in labels:
        if key in metrics and metrics[key] is not None and label not in seen:
            seen.add(label)
            rows.append((label, _fmt(metrics[key])))
    if "eval_loss" in metrics and "eval_perplexity" not in metrics and isinstance(metrics["eval_loss"], (int, float)):
        rows.append(("eval perplexity", _fmt(math.exp(metrics["eval_loss"]))))
    return rows


def parity_sentence(parity: dict, dense_dtype: str, trained_dtype: str) -> str:
    """One sentence: does the served model compute what was trained, as measured."""
    dense = f"embeddings, norms and `lm_head` are stored in {dense_dtype}" + (
        " as trained" if dense_dtype == trained_dtype else f" (trained in {trained_dtype})"
    )
    measured = (
        f"on a seeded batch of {parity['tokens']} tokens with {parity.get('compute_dtype', 'float32')} compute, "
        "the absolute difference between "
        f"served and trained logits is at most {_fmt(parity['logit_max_abs_diff'])} (mean "
        f"{_fmt(parity['logit_mean_abs_diff'])}; the logits' mean magnitude is {_fmt(parity['logit_scale'])})"
    )
    if parity["logit_max_abs_diff"] == 0:
        return f"**Train/serve parity: exact.** The loader rebuilds the trained model: {measured}; {dense}."
    return f"**Train/serve parity: not exact.** Measured: {measured}; {dense}."


def build_model_card(
    config: QuantConfig,
    fmt: ExportFormat,
    *,
    trained_config: QuantConfig,
    conversion: Conversion,
    parity: dict,
    num_layers: int,
    dense_dtype: str,
    trained_dtype: str,
    size_bytes: int,
    bf16_size_bytes: int,
    training: TrainingInfo,
    options: CardOptions,
    weights_only: bool = False,
    weight_rel_error: float | None = None,
    loss_curve: str | None = None,
):
    """Render the card; returns a ``huggingface_hub.ModelCard`` (save it as ``README.md``).

    ``config`` is what the export stores, ``trained_config`` what the model was trained with.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_model = options.base_model or training.metrics.get("base_model")
    datasets = options.datasets or ([training.metrics["dataset"]] if training.metrics.get("dataset") else [])
    served_a_bits = fmt.served_a_bits(config, weights_only=weights_only)
    stored, trained = config.quant_grid, trained_config.quant_grid  # the grids' own words (hf_cage.kernels.grid)
    tags = [*CITATION_TAGS, stored.card_tag(config.w_bits), f"w{config.w_bits}a{served_a_bits or 16}", fmt.name]
    card_data = ModelCardData(
        library_name=fmt.library_name,
        base_model=base_model,
        tags=tags,
        license=options.license,
        pipeline_tag="text-generation",
        datasets=datasets or None,
        model_name=options.model_name,
    )
    if trained_config.a_bits is None:
        activations = "not quantized (16-bit)"
    else:
        activations = trained.card_activations(trained_config.a_bits, trained_config.group_size, trained_config.a_clip)
    notes = fmt.card_notes(trained_config, conversion, weights_only=weights_only)
    metrics = training.metrics
    baselines = metrics.get("baselines") if isinstance(metrics.get("baselines"), dict) else {}
    name = options.model_name or (options.repo_id.split("/")[-1] if options.repo_id else "hf-cage quantized model")
    repo_id = options.repo_id or "path/to/this/export"
    lossy = None
    if conversion.lossy:
        lossy = {
            "grid": stored.card_converted_name or stored.card_name,
            "why": "; ".join(w for w in (conversion.weights, conversion.activations) if w),
            "weight_rel_error": _fmt(weight_rel_error) if weight_rel_error is not None else None,
        }
    return ModelCard.from_template(
        card_data,
        template_str=template_text(),
        model_name=name,
        repo_id=repo_id,
        format=fmt.name,
        format_label=fmt.label,
        w_bits=config.w_bits,
        weight_grid=trained.card_name,
        granularity="per channel" if config.granularity == "channel" else "per group",
        group_size=config.group_size,
        activations=activations,
        quantizer=trained_config.quantizer,
        hadamard=trained_config.hadamard,
        num_layers=num_layers,
        target_modules=", ".join(config.target_modules),
        dense_dtype=dense_dtype,
        size_mb=f"{size_bytes / 1e6:.2f}",
        bf16_size_mb=f"{bf16_size_bytes / 1e6:.2f}",
        size_ratio=f"{size_bytes / bf16_size_bytes:.1%}" if bf16_size_bytes else "n/a",
        lossy=lossy,
        parity=parity_sentence(parity, dense_dtype, trained_dtype),
        notes=notes,
        training=training_rows(metrics),
        baselines=[(m, _fmt(v)) for m, v in baselines.items()],
        loss_curve=loss_curve,
        base_model=base_model,
        usage=fmt.usage(repo_id),
        hf_cage_usage=fmt.hf_cage_usage(repo_id, config),
    )


def template_text() -> str:
    """The card's Jinja template, read as package data (works from a wheel, an sdist or a checkout)."""
    return resources.files(__package__).joinpath(*TEMPLATE).read_text(encoding="utf-8")
