"""Publish an export folder to the Hugging Face Hub (or any Hub-compatible endpoint).

``create_repo(exist_ok=True)`` then a single ``upload_folder`` commit. The token comes from the
caller, ``HF_TOKEN`` or the saved login; it is never printed, and any error message is scrubbed of it.
``HF_ENDPOINT`` is honoured (read when the push runs, not when huggingface_hub was imported).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PushError


def resolve_token(token: str | None = None) -> str | None:
    """``token``, else ``HF_TOKEN``, else the token saved by ``hf auth login``; ``None`` when there is none."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def _one_line(err: BaseException, token: str | None) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if token:
        text = text.replace(token, "***")
    return f"{type(err).__name__}: {text[:300]}"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload ``folder`` to ``repo_id`` in one commit; returns the commit URL.

    Raises:
        PushError: no token, or any failure talking to the Hub (one line, token scrubbed).
    """
    token = resolve_token(token)
    if not token:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    folder = Path(folder)
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} exported with hf-cage",
        )
    except Exception as err:  # every failure becomes one line for the user
        raise PushError(_one_line(err, token)) from None
    return str(getattr(info, "commit_url", info))
