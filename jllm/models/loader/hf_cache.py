"""Turn a model argument into a local path: a folder, a .gguf file, or a repo id in the HF cache.

jllm never downloads. A repo id is looked up offline in the Hugging Face hub cache layout
(`models--org--name/refs/<revision>` names a commit, `snapshots/<commit>/` holds the files),
so anything fetched earlier with `hf download` or transformers is found without the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def hf_hub_cache_dir() -> Path:
    """The hub cache folder, resolved the way huggingface_hub resolves it."""
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        return Path(hub_cache).expanduser()
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local folder or .gguf file for `model`; a repo id ("org/name") is found in the HF cache.

    `revision` picks a branch/tag (a file under `refs/`) or a commit hash of a cached repo; it is
    ignored for local paths, which have no revisions.
    """
    if os.path.isdir(model) or (model.endswith(".gguf") and os.path.isfile(model)):
        return model
    snapshot = _find_cached_snapshot(model, revision)
    if snapshot is None:
        raise ValueError(_not_found_message(model, revision))
    return str(snapshot)


def _find_cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    # Only plain ids can be cache keys; anything else (a missing path, "a/b/c") is simply absent.
    if repo_id.endswith(".gguf") or repo_id.count("/") > 1 or not repo_id.strip("/"):
        return None
    repo_dir = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    ref_file = repo_dir / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text().strip()
    elif _COMMIT_HASH.match(revision):
        commit = revision
    else:
        return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _not_found_message(model: str, revision: str | None) -> str:
    at_revision = f" at revision {revision!r}" if revision else ""
    return (
        f"Model {model!r}{at_revision} was not found locally: it is not an existing folder or "
        f".gguf file, and not in the Hugging Face cache ({hf_hub_cache_dir()}). jllm never "
        "downloads models (it makes no network calls). Pass a local folder holding config.json "
        "and *.safetensors, or a path to a .gguf file, or fetch the model first, e.g. "
        f"`hf download {model}`, and run again."
    )
