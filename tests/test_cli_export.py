"""`hf-cage export` end to end: checkpoints on disk in, packed checkpoints out, plain transformers loading them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import (
    INT_W4,
    INT_W4A4_GROUP,
    METRICS,
    QUEST_W4A4,
    activations_unquantized,
    logits,
    qat_model,
    save_checkpoint,
)

from hf_cage.cli import build_parser, main
from hf_cage.export import load_quantized
from hf_cage.export.served import served_eval_many
from hf_cage.qat import CONFIG_KEY

REPO_ROOT = Path(__file__).resolve().parents[1]


def export(*argv: str) -> int:
    return main(["export", *argv, "--no-progress"])


def test_exports_load_in_plain_transformers_without_hf_cage(tmp_path, token_batch):
    """Stock transformers (a process without hf_cage) serves each default export exactly as trained.

    W4 int (A16), W4A4 int with declared activations (compressed-tensors applies the trained a_clip="minmax"
    rule at load), the same sharded, and the W4A4 model exported --weights-only (served as W4A16).
    """
    w4 = qat_model(1, **INT_W4)
    w4a4 = qat_model(2, **INT_W4A4_GROUP)
    assert export(str(save_checkpoint(tmp_path / "w4", w4)), "-o", str(tmp_path / "e-w4")) == 0
    ckpt = save_checkpoint(tmp_path / "w4a4", w4a4, trainer_checkpoint=False)
    assert export(str(ckpt), "-o", str(tmp_path / "e-w4a4")) == 0
    assert export(str(ckpt), "-o", str(tmp_path / "e-sharded"), "--max-shard-size", "30KB") == 0
    assert export(str(ckpt), "-o", str(tmp_path / "e-w4a16"), "--weights-only") == 0
    assert len(list((tmp_path / "e-sharded").glob("model-*-of-*.safetensors"))) > 2

    names = ["e-w4", "e-w4a4", "e-sharded", "e-w4a16"]
    served = served_eval_many([tmp_path / n for n in names], token_batch, logits=True)
    plain = {n: r.logits for n, r in zip(names, served)}
    torch.testing.assert_close(plain["e-w4"], logits(w4, token_batch), atol=0, rtol=0)
    torch.testing.assert_close(plain["e-w4a4"], logits(w4a4, token_batch), atol=0, rtol=0)
    torch.testing.assert_close(plain["e-sharded"], plain["e-w4a4"], atol=0, rtol=0)
    with activations_unquantized(w4a4):
        torch.testing.assert_close(plain["e-w4a16"], logits(w4a4, token_batch), atol=0, rtol=0)
    assert not torch.allclose(logits(w4a4, token_batch), plain["e-w4a16"], atol=1e-3)
    # ... and load_quantized serves each export as stock transformers does (the --weights-only one as W4A16).
    for name in ("e-w4a4", "e-sharded", "e-w4a16"):
        loaded = load_quantized(tmp_path / name)
        torch.testing.assert_close(logits(loaded, token_batch), plain[name], atol=0, rtol=0)


def test_trainer_checkpoint_gets_tokenizer_card_and_loss_curve(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4A4_GROUP), metrics=METRICS)
    out = tmp_path / "export"
    assert export(str(ckpt), "--output-dir", str(out), "--base-model", "org/base", "--dataset", "allenai/c4") == 0
    files = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "README.md", "loss_curve.png"}
    assert expected | {"tokenizer.json", "tokenizer_config.json"} <= files
    assert "optimizer.pt" not in files and "trainer_state.json" not in files
    printed = capsys.readouterr().out
    assert "exported 14 quantized layers" in printed and "compressed-tensors, dense float32" in printed
    assert "train/serve parity: exact" in printed
    card = (out / "README.md").read_text()
    assert "base_model: org/base" in card and "| CAGE lambda | 10 |" in card and "| steps | 10 |" in card


def test_quest_model_exports_by_default_in_the_hf_cage_format(tmp_path, token_batch, capsys):
    model = qat_model(**QUEST_W4A4)
    ckpt = save_checkpoint(tmp_path / "run", model, trainer_checkpoint=False)
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("format auto: hf-cage, because") and "hf_cage.load_quantized" in printed[0]
    loaded = load_quantized(tmp_path / "out")
    torch.testing.assert_close(logits(loaded, token_batch), logits(model, token_batch), atol=0, rtol=0)


def test_lossy_conversion_prints_the_measured_error(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**QUEST_W4A4), trainer_checkpoint=False)
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(tmp_path / "refused"), "--format", "compressed-tensors") == 2
    err = capsys.readouterr().err
    assert "--format hf-cage" in err and "--allow-lossy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    argv = ["-o", str(tmp_path / "lossy"), "--format", "compressed-tensors", "--allow-lossy"]
    assert export(str(ckpt), *argv) == 0
    printed = capsys.readouterr().out
    assert "relative weight error" in printed and "logit difference on a sample batch max" in printed


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = save_checkpoint(tmp_path / "good", qat_model(**INT_W4), trainer_checkpoint=False)
    config = json.loads((good / "config.json").read_text())
    dense = dict(config)
    dense.pop(CONFIG_KEY)
    no_weights = _write(tmp_path / "no-weights" / "config.json", json.dumps(config)).parent
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    _write(truncated / "config.json", json.dumps(config))
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:100])
    quest = save_checkpoint(tmp_path / "quest", qat_model(**QUEST_W4A4), trainer_checkpoint=False)
    two_bit = save_checkpoint(
        tmp_path / "w2", qat_model(quantizer="quest", w_bits=2, a_bits=None), trainer_checkpoint=False
    )
    return {
        "missing": (tmp_path / "does-not-exist", "not found"),
        "no-config": (_write(tmp_path / "empty" / "x.txt", "").parent, "no config.json"),
        "malformed-config": (_write(tmp_path / "bad" / "config.json", "{not json").parent, "malformed"),
        "dense-model": (_write(tmp_path / "dense" / "config.json", json.dumps(dense)).parent, "no quantized layers"),
        "no-weights": (no_weights, "has no weights"),
        "truncated-weights": (truncated, "not a readable safetensors file"),
        "quest-to-compressed-tensors": (quest, "--format hf-cage"),
        "unsupported-bits": (two_bit, "w_bits=2"),
        "bad-shard-size": (good, "max_shard_size"),
        "invalid-repo-id": (good, "not a valid repo id"),
    }


BAD = [
    "missing",
    "no-config",
    "malformed-config",
    "dense-model",
    "no-weights",
    "truncated-weights",
    "quest-to-compressed-tensors",
    "unsupported-bits",
    "bad-shard-size",
    "invalid-repo-id",
]
EXTRA = {
    "quest-to-compressed-tensors": ["--format", "compressed-tensors"],
    "bad-shard-size": ["--max-shard-size", "lots"],
    "invalid-repo-id": ["--push-to-hub", "not a/valid/repo id!!", "--token", "hf_x"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, case):
    path, message = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out" / "export"
    before = sorted(p for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert export(str(path), "-o", str(out), *EXTRA.get(case, [])) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-cage export: error:") and message in lines[0], captured.err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_non_empty_output_dir_and_overwrite(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    out = tmp_path / "out"
    _write(out / "old.txt", "keep me")
    assert export(str(ckpt), "-o", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "old.txt").read_text() == "keep me"
    assert export(str(ckpt), "-o", str(out), "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["itself", "run-folder", "inside"])
def test_output_dir_cannot_hold_or_be_inside_the_checkpoint(tmp_path, capsys, where):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), metrics=METRICS)
    out = {"itself": ckpt, "run-folder": ckpt.parent, "inside": ckpt / "export"}[where]
    before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(out), "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0]
    assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_dot_with_overwrite_is_refused_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    work = tmp_path / "work"
    _write(work / "notes.txt", "mine")
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert export(str(ckpt), "-o", ".", "--overwrite") == 2
    assert "current directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "work"] and os.listdir(work) == ["notes.txt"]


def test_os_errors_are_one_line_with_exit_3(tmp_path, capsys, monkeypatch):
    import errno

    import huggingface_hub

    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    blocker = _write(tmp_path / "a-file", "x")
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(blocker / "sub" / "out")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-cage export: error: cannot create") and "Not a directory" in err[0]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", full_disk)
    assert export(str(ckpt), "-o", str(tmp_path / "out")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "run"]


def test_ctrl_c_is_one_line_with_exit_130(tmp_path, capsys, monkeypatch):
    import hf_cage.export.api as api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "build_model_card", interrupted)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(tmp_path / "out")) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["hf-cage export: error: interrupted; nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_safetensors_disk_full_is_one_line_exit_3_and_nothing_left(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", full_disk)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    capsys.readouterr()
    assert export(str(ckpt), "-o", str(tmp_path / "new" / "parents" / "out")) == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        f"hf-cage export: error: could not write the export to {str(tmp_path / 'new' / 'parents' / 'out')!r}: "
        "No space left on device"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_ctrl_c_during_start_up_is_one_line_with_exit_130(capsys, monkeypatch):
    import hf_cage.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        code = cli.main(["export", "run", "-o", "out"])
    except KeyboardInterrupt:  # escaping, it would end the whole pytest session
        pytest.fail("Ctrl-C during start-up escaped as a traceback")
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["hf-cage: interrupted; nothing was written"]


# The console script's own start-up (``from hf_cage.cli import main; sys.exit(main())``) with Ctrl-C arriving while
# torch is being imported, the longest part of it.
INTERRUPTED_START = """
import sys


class CtrlCDuringTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt


sys.meta_path.insert(0, CtrlCDuringTorchImport())
from hf_cage.cli import main

sys.exit(main(["export", "run", "-o", "out"]))
"""


def test_ctrl_c_while_the_command_imports_torch_is_exit_130_not_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_START], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["hf-cage: interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_max_shard_size_accepts_binary_units(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    assert export(str(ckpt), "-o", str(tmp_path / "gib"), "--max-shard-size", "2GiB") == 0
    assert export(str(ckpt), "-o", str(tmp_path / "kib"), "--max-shard-size", "30KiB") == 0
    assert (tmp_path / "gib" / "model.safetensors").is_file()
    assert len(list((tmp_path / "kib").glob("model-*-of-*.safetensors"))) > 2


# Runs the CLI with the card step slowed down, so a signal can arrive while the staging folder exists.
SLOW_EXPORT = """
import sys, time
import hf_cage.export.api as api
card = api.build_model_card
def slow(*args, **kwargs):
    time.sleep(60)
    return card(*args, **kwargs)
api.build_model_card = slow
from hf_cage.cli import main
sys.exit(main(["export", *sys.argv[1:], "--no-progress"]))
"""


def _start_and_signal(tmp_path: Path, ckpt: Path, signum: int) -> tuple[int, str]:
    import signal
    import time

    out = tmp_path / "exports" / "out"
    out.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, str(ckpt), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".out.hf-cage-staging-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert signum == signal.SIGKILL or proc.returncode == 130, err
    return proc.returncode, err


def test_sigterm_cleans_up_and_sigkill_leftovers_are_removed_by_the_next_export(tmp_path):
    import signal

    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    code, err = _start_and_signal(tmp_path, ckpt, signal.SIGTERM)
    assert err.strip().splitlines()[-1] == "hf-cage export: error: interrupted; nothing was written"
    assert os.listdir(tmp_path / "exports") == []
    _start_and_signal(tmp_path, ckpt, signal.SIGKILL)
    assert len(list((tmp_path / "exports").glob(".out.hf-cage-staging-*"))) == 1  # killed: nothing could clean up
    assert export(str(ckpt), "-o", str(tmp_path / "exports" / "other")) == 0
    assert sorted(os.listdir(tmp_path / "exports")) == ["other"]


def test_push_without_a_token_exits_2_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    assert export(str(ckpt), "-o", str(tmp_path / "out"), "--push-to-hub", "me/model") == 2
    assert "token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_the_push_says_the_export_is_kept(tmp_path, capsys, monkeypatch):
    import hf_cage.export.hub as hub

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "push_folder", interrupted)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    capsys.readouterr()
    out = tmp_path / "out"
    assert export(str(ckpt), "-o", str(out), "--push-to-hub", "me/model", "--token", "hf_x") == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"hf-cage export: error: interrupted; the export is kept in {out}"
    ]
    assert (out / "config.json").is_file()


def test_help_explains_every_flag_with_examples(capsys):
    parser = build_parser()
    export_parser = parser._subparsers._group_actions[0].choices["export"]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [opt for action in export_parser._actions for opt in action.option_strings if opt.startswith("--")]
    assert len(flags) >= 18
    for action in export_parser._actions:
        assert action.help, action.option_strings
        for opt in action.option_strings:
            assert opt in text, opt
    assert "examples:" in text and "hf-cage export outputs/" in text and "--push-to-hub me/" in text
    assert "exit codes" in text and "3 OS error" in text and "130 interrupted" in text
    assert "{auto,compressed-tensors,mxfp4-pack-quantized,nvfp4-pack-quantized,hf-cage}" in text


def test_top_level_cli_lists_export(capsys):
    assert main([]) == 2  # no command: help on stderr, argparse's usage-error code (tests/test_cli.py)
    assert "export" in capsys.readouterr().err


def test_the_readme_pretrain_then_export_flow_runs_with_defaults(tmp_path, capsys, token_batch):
    """README: `pretrain_llama.py --config tiny --method cage --output_dir outputs/tiny-cage`, then
    `hf-cage export outputs/tiny-cage --output-dir exports/tiny-w4` (fewer steps and a small text here)."""
    from test_recipes import pretrain_argv, pretrain_llama, write_text

    import hf_cage

    text = (write_text(tmp_path / "A.txt", 0, 200), write_text(tmp_path / "B.txt", 1, 60))
    run = tmp_path / "outputs" / "tiny-cage"
    assert pretrain_llama.main(pretrain_argv(text, run, "cage", steps=2)) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--output-dir", str(tmp_path / "exports" / "tiny-w4")]) == 0
    printed = capsys.readouterr().out
    trained = hf_cage.load_qat_model(run, dtype=torch.float32)
    config = hf_cage.quant_config_of(trained)
    expected = "compressed-tensors" if config.quantizer == "int" and not config.hadamard else "hf-cage"
    assert f"({expected}, dense float32" in printed and "train/serve parity: exact" in printed
    if expected == "hf-cage":
        assert printed.startswith("format auto: hf-cage, because") and "hf_cage.load_quantized(path)" in printed
    loaded = load_quantized(tmp_path / "exports" / "tiny-w4")
    batch = token_batch % trained.config.vocab_size
    torch.testing.assert_close(logits(loaded, batch), logits(trained, batch), atol=0, rtol=0)
