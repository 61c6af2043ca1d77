"""Pushing an export with the real huggingface_hub client to a Hub-like server on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer
from test_export import INT_W4, INT_W4A4_GROUP, METRICS, qat_model, save_checkpoint

from hf_cage.cli import main
from hf_cage.export import PushError, push_folder

TOKEN = "hf_testSECRETtoken0123456789"
HUB_ENDPOINTS = {"create", "validate_yaml", "branch", "preupload", "commit", "tree"}


@pytest.fixture
def hub(monkeypatch):
    """A running server, with this process's huggingface_hub pointed at it (online, no Xet)."""
    import huggingface_hub.constants as constants

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield server


def _hub_requests(server: HubServer) -> list[dict]:
    return [r for r in server.requests if r["endpoint"] in HUB_ENDPOINTS]


def test_cli_export_and_push_end_to_end_in_a_subprocess(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4A4_GROUP), metrics=METRICS)
    out = tmp_path / "export"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with HubServer() as server:
        env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"))
        argv = [str(ckpt), "-o", str(out), "--push-to-hub", "me/tiny-cage", "--private", "--revision", "dev"]
        argv += ["--commit-message", "first export"]
        done = subprocess.run(
            [sys.executable, "-m", "hf_cage.cli", "export", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert TOKEN not in done.stdout + done.stderr
    assert "pushed to me/tiny-cage" in done.stdout
    uploaded = server.files[("me/tiny-cage", "dev")]
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(uploaded) == set(local) and {"model.safetensors", "config.json", "README.md"} <= set(uploaded)
    assert all(uploaded[name] == data for name, data in local.items())
    assert server.repos["me/tiny-cage"] == {"private": True, "branches": {"main", "dev"}}
    assert [c["summary"] for c in server.commits] == ["first export"]
    requests = _hub_requests(server)
    assert {r["endpoint"] for r in requests} >= {"create", "preupload", "commit"}
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in requests)


def test_push_folder_sends_the_token_from_the_flag(tmp_path, hub, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    url = push_folder(folder, "me/flag", token=TOKEN)
    assert "/me/flag/commit/" in url
    assert hub.files[("me/flag", "main")]["model.safetensors"] == b"\x00" * 64
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in _hub_requests(hub))
    assert TOKEN not in "".join(capsys.readouterr())


@pytest.mark.parametrize("failing", ["create", "commit"])
def test_server_error_gives_one_line_and_keeps_the_export(tmp_path, hub, capsys, monkeypatch, failing):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4), trainer_checkpoint=False)
    out = tmp_path / "export"
    hub.fail_on = failing
    capsys.readouterr()
    code = main(["export", str(ckpt), "-o", str(out), "--push-to-hub", "me/broken", "--token", TOKEN, "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hf-cage export: error: push to me/broken failed") and "500" in lines[0]
    assert f"the export is kept in {out}" in lines[0]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_push_error_messages_never_contain_the_token(tmp_path, hub):
    hub.fail_on, hub.fail_status = "preupload", 403
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / TOKEN).write_text("a file named like the token")
    with pytest.raises(PushError) as info:
        push_folder(folder, "me/leak", token=TOKEN)
    assert TOKEN not in str(info.value) and "\n" not in str(info.value)


def test_unreachable_endpoint_is_a_push_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = Path(tmp_path)
    with pytest.raises(PushError, match="Error"):
        push_folder(folder, "me/x", token=TOKEN, endpoint="http://127.0.0.1:9")
