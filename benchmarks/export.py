"""Export time of ``hf_cage.export_model`` against compressed-tensors' own compressor, and size on disk vs bf16.

    python benchmarks/export.py                        # ~110M-parameter Llama, W4A16 group 128, 5 interleaved repeats
    python benchmarks/export.py --preset tiny --repeats 1
    python benchmarks/export.py --output docs/export_bench.md

One randomly initialised Llama (weights rounded to bf16), quantized with the ``int`` quantizer
(4-bit weights, absmax, group 128, activations unquantized), is exported in the same process by:

- **hf-cage**: ``export_model(dtype="bfloat16")`` = per-group scales + codes (``pack_weight``), int4
  packing, the train/serve parity measurement (two forward passes on a 128-token sample batch), one
  safetensors file, config, model card;
- **compressed-tensors**: the llm-compressor route on a dense copy: ``apply_quantization_config``
  (W4A16 group 128), ``weight_scale`` set to hf-cage's scales (so both quantize to the same grid),
  ``ModelCompressor.compress_model`` + ``save_pretrained`` + ``update_config``. Computing scales is not
  timed for it (its observers would pick different ones), so it does a little less work than hf-cage.

Both exports are checked to hold bit-identical ``weight_packed`` / ``weight_scale`` tensors. Sizes are
the safetensors files; "bf16" is the dense model saved with ``save_pretrained`` in bf16. Timings are
wall clock (median of ``--repeats``, the exporters taking turns) on whatever CPU runs this, so
they move with machine load.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "micro": (128, 256, 2, 4, 2, 512),
    "tiny": (256, 768, 4, 4, 2, 4096),
    "110m": (1024, 2816, 8, 16, 4, 8192),
    "400m": (2048, 5632, 6, 16, 4, 32000),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="110m", help="model shape (default: 110m)")
    parser.add_argument("--group-size", type=int, default=128, help="weight group size (default: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each exporter (default: 5)")
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    return parser.parse_args(argv)


def build_model(preset: str, group_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_cage import QuantConfig, quantize_model

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    dense = copy.deepcopy(model)
    quant = QuantConfig(quantizer="int", a_bits=None, clip="absmax", granularity="group", group_size=group_size)
    return quantize_model(model, quant), dense


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def interleaved(runs: dict, repeats: int) -> tuple[dict[str, float], dict[str, Path]]:
    """Median wall time of each ``fn(out_dir)`` in ``runs``, taking turns so machine load hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    outputs: dict[str, Path] = {}
    for _ in range(repeats):
        for label, fn in runs.items():
            out = Path(tempfile.mkdtemp(prefix="hf-cage-bench-")) / "export"
            start = time.perf_counter()
            fn(out)
            times[label].append(time.perf_counter() - start)
            if label in outputs:
                shutil.rmtree(outputs[label].parent, ignore_errors=True)
            outputs[label] = out
    return {label: statistics.median(t) for label, t in times.items()}, outputs


def export_hf_cage(model, out: Path) -> None:
    from hf_cage.export import export_model

    # bf16 dense parts like the compressed-tensors reference (the default, "auto", keeps the trained fp32);
    # the time includes hf-cage's train/serve parity measurement (two forward passes on a sample batch).
    export_model(model, out, dtype="bfloat16", progress=False, log=None)


def export_compressed_tensors(dense, scales: dict, group_size: int, out: Path) -> None:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model = copy.deepcopy(dense).to(torch.bfloat16)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]), run_compressed=False
    )
    with torch.no_grad():
        for name, scale in scales.items():
            model.get_submodule(name).weight_scale.data = scale.clone()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)


def main(argv=None) -> int:
    import torch

    with torch.no_grad():  # scoped: tests call main() in-process
        return _main(argv)


def _main(argv) -> int:
    args = parse_args(argv)
    import torch
    from safetensors.torch import load_file

    from hf_cage import kernels, quantized_layers

    model, dense = build_model(args.preset, args.group_size)
    params = sum(p.numel() for p in dense.parameters())
    scales = {
        name: kernels.quantize_rows(layer.weight, layer.weight_spec)[1] for name, layer in quantized_layers(model)
    }

    bf16_dir = Path(tempfile.mkdtemp(prefix="hf-cage-bench-")) / "bf16"
    copy.deepcopy(dense).to(torch.bfloat16).save_pretrained(bf16_dir)
    bf16 = folder_bytes(bf16_dir)

    layers = list(quantized_layers(model))
    runs = {
        "hf-cage": lambda out: export_hf_cage(model, out),
        "compressed-tensors": lambda out: export_compressed_tensors(dense, scales, args.group_size, out),
        "quantize_rows": lambda out: [kernels.quantize_rows(layer.weight, layer.weight_spec) for _, layer in layers],
    }
    seconds, outputs = interleaved(runs, args.repeats)
    ours_dir, ct_dir = outputs["hf-cage"], outputs["compressed-tensors"]

    ours, theirs = load_file(ours_dir / "model.safetensors"), load_file(ct_dir / "model.safetensors")
    packed_keys = [k for k in ours if k.endswith(("weight_packed", "weight_scale"))]
    identical = all(torch.equal(ours[k], theirs[k]) for k in packed_keys) and len(packed_keys) == 2 * len(scales)

    rows = [
        (
            "hf-cage `export_model` (scales + codes, packing, safetensors, config, card)",
            seconds["hf-cage"],
            folder_bytes(ours_dir),
        ),
        ("... of which scales + codes alone (`quantize_rows`)", seconds["quantize_rows"], None),
        (
            "compressed-tensors `ModelCompressor` (given the scales)",
            seconds["compressed-tensors"],
            folder_bytes(ct_dir),
        ),
        ("dense bf16 `save_pretrained`", None, bf16),
    ]
    lines = [
        f"Llama preset `{args.preset}` ({params / 1e6:.1f}M parameters, {len(scales)} quantized linears), "
        f"W4A16 int, group {args.group_size}; median of {args.repeats} interleaved runs; "
        f"torch threads {torch.get_num_threads()}.",
        "",
        "| exporter | time (s) | size on disk (MB) | size vs bf16 |",
        "|---|---|---|---|",
    ]
    for label, secs, size in rows:
        time_text = f"{secs:.2f}" if secs is not None else "-"
        size_text = f"{size / 1e6:.1f} | {size / bf16:.1%}" if size is not None else "- | -"
        lines.append(f"| {label} | {time_text} | {size_text} |")
    lines += ["", f"packed tensors bit-identical between the two exports: {'yes' if identical else 'NO'}"]
    for folder in [bf16_dir, *outputs.values()]:
        shutil.rmtree(folder.parent, ignore_errors=True)
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
