"""The peer benchmark's plumbing (benchmarks/peer.py --dry-run: hf-cage's side, torchao not needed)."""

from __future__ import annotations

import json


def test_dry_run_reports_every_format_against_bf16(tmp_path, capsys, import_benchmark):
    bench = import_benchmark("peer")
    out = tmp_path / "peer.json"
    results = bench.main(["--dry-run", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    names = [f"hf_cage/{name}" for name in bench.FORMATS] + ["hf_cage/quest_w4a4"]
    assert sorted(results["rows"]) == sorted(names)
    for key in ("step_median_s", "forward_median_s", "saved_bytes"):
        assert sorted(results[key]) == sorted(["bf16", *names]) and all(v > 0 for v in results[key].values())
    row = results["rows"]["hf_cage/w4a4_g32"]
    assert row["step_over_bf16"] == results["step_median_s"]["hf_cage/w4a4_g32"] / results["step_median_s"]["bf16"]
    assert row["saved_over_bf16"] == results["saved_bytes"]["hf_cage/w4a4_g32"] / results["saved_bytes"]["bf16"]
    assert "step_over_torchao" not in row  # no peer in a dry run
    table = capsys.readouterr().out
    assert table.count("| hf_cage |") == len(names)


def test_saved_bytes_counts_what_autograd_keeps_once_per_storage(import_benchmark):
    import torch
    from torch import nn

    bench = import_benchmark("train_step")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 64, bias=False)

        def forward(self, input_ids, labels):
            x = input_ids.float()
            y = self.linear(x)  # saves x (not a parameter) and the weight (excluded)
            return type("Out", (), {"loss": (y * y).sum()})  # y * y saves y once (same storage twice)

    ids = torch.ones(8, 64)
    assert bench.saved_bytes(Tiny(), ids) == 2 * 8 * 64 * 4
