"""`make run` (python -m flows.demo): the README's main job, run as a user runs it, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmadapter.demo_models import SMOLLM2_GGUF_NAME

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_main_job_registers_both_models_and_answers_paris(tmp_path: Path, smollm2_gguf: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # The wheel the demo would download from PyPI, already fetched for the other SmolLM2 tests.
    (data / SMOLLM2_GGUF_NAME).symlink_to(smollm2_gguf)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LLMADAPTER_"))}
    result = subprocess.run(
        [sys.executable, "-m", "flows.demo", "--data-dir", str(data)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert f"MLflow registry at sqlite:///{data / 'mlflow.db'}" in out
    for name, task in (("smollm2-chat", "llm/v1/chat"), ("minilm-embeddings", "llm/v1/embeddings")):
        block = out[out.index(f"  {name}  ({task}") :]
        assert "version 1: @challenger @champion" in block.splitlines()[1]
        assert "validation passed" in block.splitlines()[1]
        assert block.splitlines()[2].startswith("    this run: registered v1: passed:")
    # The chat model passed the quality gate on the shipped evaluation set before it registered.
    assert "    quality: quality gate passed on smollm2_basics@" in out
    assert "models:/smollm2-chat@champion answers 'What is the capital of France?':" in out
    assert "The capital of France is Paris." in out
    # Everything stayed under the data dir: MLflow store, artifacts and Prefect's home.
    assert (data / "mlflow.db").is_file() and (data / "prefect" / "prefect.db").is_file()
