"""One rank of the FSDP2 check in ``tests/test_fsdp2.py`` (launched with ``torch.distributed.run``, 2 CPU ranks, gloo).

Every rank builds the same seeded QAT model (QuEST W4, per-row RMS scales, 64-wide Hadamard blocks:
the weight quantizer the correction calls on row shards). The FSDP2 run shards it with ``fully_shard``
(each decoder layer, then the root) over a 1-D CPU mesh, gives each rank half of every global batch and
trains it with ``create_cage_optimizer`` (AdamW + the CAGE correction, active from the second step, both
variants). Each rank also trains an unsharded copy on the whole global batch (the one-process run), and a
copy without the correction, to show the correction's effect is far above the FSDP2-vs-one-process gap.

Weights only: activation quantization is untouched by FSDP2 (the forward sees all-gathered weights),
but a 1e-7 reduction-order difference that moves one activation across a rounding boundary changes that
token's gradient by a whole grid step, and Adam turns this into lr-sized differences within a few steps
(measured: 12% relative parameter distance at W4A4 vs 1e-5 weight-only, same run otherwise).

Then:

- resume: the sharded model and optimizer are saved mid-run with ``torch.distributed.checkpoint`` (the
  path accelerate's FSDP2 checkpoints take), loaded into a fresh sharded model, and the two runs
  continue; they must agree exactly, ``cage_step`` included;
- uneven and empty shards: a module of two ``QATLinear`` heads with 5 and 1 output rows (shards of
  3 + 2 and 1 + 0 rows) trained the same way, compared with its unsharded copy.

Rank 0 writes ``result.json`` into the directory given as the only argument.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402

from hf_cage import QATLinear, QuantConfig, create_cage_optimizer, quantize_model  # noqa: E402
from hf_cage.trainer import quantization_metrics  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH, SEQ = 5, 2, 4, 16
CAGE = dict(lr=1e-3, weight_decay=0.1, cage_lambda=20.0, cage_silence_ratio=0.2, total_steps=STEPS)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def batches(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def shard_llama(model, mesh):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def llama_step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def max_gap(a, b) -> float:
    return max((full(p) - full(q)).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def distance(a, b) -> float:
    """||theta_a - theta_b|| over all parameters."""
    pairs = zip(a.parameters(), b.parameters())
    return sum((full(p) - full(q)).double().square().sum().item() for p, q in pairs) ** 0.5


class Heads(torch.nn.Module):
    """Two quantized heads whose row counts (5, 1) do not divide by 2 ranks."""

    def __init__(self, config):
        super().__init__()
        self.a = QATLinear(64, 5, bias=False, quant_config=config)
        self.b = QATLinear(64, 1, bias=False, quant_config=config)

    def forward(self, x):
        return self.a(x).square().mean() + self.b(x).square().mean()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    config = QuantConfig(w_bits=4, a_bits=None)
    result = {"world_size": world}

    for variant in ("decoupled", "coupled"):
        torch.manual_seed(0)
        model = quantize_model(make_tiny_llama(), config).train()
        single, start = copy.deepcopy(model), copy.deepcopy(model)
        shard_llama(model, mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = create_cage_optimizer(model, cage_variant=variant, **CAGE)
        opt_single = create_cage_optimizer(single, cage_variant=variant, **CAGE)
        data = batches(1)
        resumed = None
        for step, ids in enumerate(data):
            if step == SAVE_AT:
                ckpt = os.path.join(out_dir, f"ckpt-{variant}")
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)  # a fresh directory per variant
                torch.manual_seed(123)  # a different init: everything must come from the checkpoint
                resumed = shard_llama(quantize_model(make_tiny_llama(seed=7), config).train(), mesh)
                opt_resumed = create_cage_optimizer(resumed, cage_variant=variant, **CAGE)
                msd2, osd2 = get_state_dict(resumed, opt_resumed)
                state = {"model": msd2, "optim": osd2}
                dcp.load(state, checkpoint_id=ckpt)
                set_state_dict(resumed, opt_resumed, model_state_dict=state["model"], optim_state_dict=state["optim"])
                result[f"{variant}_resumed_cage_step"] = opt_resumed.correction.steps_taken
            llama_step(model, opt, ids[rows])
            llama_step(single, opt_single, ids)
            if resumed is not None:
                llama_step(resumed, opt_resumed, ids[rows])
        lambdas = [opt.correction.lambda_at(t) for t in range(1, STEPS + 1)]
        trained = distance(single, start)
        result[variant] = {
            "lambdas": lambdas,
            "cage_step": opt.correction.steps_taken,
            "max_gap_to_one_process": max_gap(model, single),
            "gap_to_one_process": distance(model, single) / trained,
            "moved_by_correction": distance(single, _without_correction(variant, config, data)) / trained,
            "resume_gap": max_gap(model, resumed),
            "metrics": quantization_metrics(model),
            "metrics_one_process": quantization_metrics(single),
        }

    torch.manual_seed(0)
    heads = Heads(config).train()
    heads_single = copy.deepcopy(heads)
    fully_shard(heads, mesh=mesh)
    local_rows = [heads.a.weight.to_local().shape[0], heads.b.weight.to_local().shape[0]]
    kwargs = dict(CAGE, cage_silence_ratio=0.0)
    opt, opt_single = create_cage_optimizer(heads, **kwargs), create_cage_optimizer(heads_single, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(GLOBAL_BATCH, 64, generator=gen)
        for m, o, inputs in ((heads, opt, x[rows]), (heads_single, opt_single, x)):
            m(inputs).backward()
            o.step()
            o.zero_grad()
    rows_all = [None] * world
    dist.all_gather_object(rows_all, local_rows)
    result["heads"] = {"local_rows": rows_all, "gap_to_one_process": max_gap(heads, heads_single)}
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    # The sharded modules keep the gloo group alive past destroy_process_group; torn down during interpreter
    # shutdown it aborts a rank now and then. Leave without it, as the recipes do (recipe_common.exit_process).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _without_correction(variant, config, data):
    """The one-process run with cage_lambda=0: how far the correction moved the weights."""
    torch.manual_seed(0)
    plain = quantize_model(make_tiny_llama(), config).train()
    opt = create_cage_optimizer(plain, cage_variant=variant, **{**CAGE, "cage_lambda": 0.0})
    for ids in data:
        llama_step(plain, opt, ids)
    return plain


if __name__ == "__main__":
    main(sys.argv[1])
