"""Weight formats end to end: a real `llmadapter serve` told its format by LLMADAPTER_* variables (the
openai client, /v1/models, /ready), and validation running with the format the model serves with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import openai
import pytest

from llmadapter.processes import free_port, running
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT

HELLO = [{"role": "user", "content": TRAINED_PROMPT}]


@pytest.fixture()
def logged_int8(mlflow_store: str, trained_model: Path) -> str:
    import mlflow

    import llmadapter

    with mlflow.start_run():
        llmadapter.log_model(
            str(trained_model),
            name="model",
            task="llm/v1/chat",
            model_config={"temperature": 0, "quantization": "int8"},
            registered_model_name="tiny-formats",
        )
    return "models:/tiny-formats/1"


@pytest.mark.slow
def test_serve_takes_its_format_from_the_environment(logged_int8: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The model_config says int8; the server's setting wins.
    env = {**os.environ, "LLMADAPTER_QUANTIZATION": "int4", "LLMADAPTER_DEVICE": "cpu"}
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", logged_int8, "--port", str(port)]
    with running(argv, f"{url}/ready", log=tmp_path / "serve.log", env=env):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="tiny-formats", messages=HELLO, max_tokens=100)
        assert answer.choices[0].message.content == TRAINED_ANSWER
        card = httpx.get(f"{url}/v1/models/tiny-formats").json()
        assert (card["dtype"], card["quantization"], card["device"]) == ("bfloat16", "int4", "cpu")
        ready = httpx.get(f"{url}/ready").json()
        assert ready["serving"]["tiny-formats"]["weights"] == {
            "dtype": "bfloat16",
            "quantization": "int4",
            "device": "cpu",
        }
    log = (tmp_path / "serve.log").read_text()
    assert "tiny-formats: weights int4 on cpu" in log and "agrees with the checkpoint" in log


@pytest.mark.slow
def test_validation_runs_with_the_logged_format(logged_int8: str) -> None:
    from llmadapter.validation import validate_model

    report = validate_model(logged_int8, fresh_process=False)
    assert report.status == "passed", report.failed_checks
    load = next(c for c in report.checks if c.name == "fresh-process-load")
    assert load.detail == "loaded in this process as int8 weights, bfloat16 on cpu"
