"""`llmadapter serve` as a user runs it (a real process, a logged model), and `mlflow models serve` too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmadapter.cli import build_parser, main
from llmadapter.processes import free_port, running
from llmadapter.testing import TRAINED_ANSWER

HELLO = [{"role": "user", "content": "Hello"}]
# The logged model's model_config cuts answers at this many tokens unless a request says otherwise.
STORED_MAX_TOKENS = 12


def test_every_server_setting_is_a_flag() -> None:
    args = build_parser().parse_args(
        ["serve", "models:/a@x", "--port", "9000", "--max-queue", "4", "--shutdown-grace-s", "2.5"]
    )
    assert (args.port, args.max_queue, args.shutdown_grace_s) == ("9000", "4", "2.5")
    assert args.host is None  # not given: the environment or the default decides


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "a", "--port", "70000"], "--port"),
        (["serve", "a", "--max-body-bytes", "10"], "--max-body-bytes"),
        (["serve", "a", "--shutdown-grace-s", "-1"], "--shutdown-grace-s"),
        (["serve", "a", "b", "--name", "x"], "once per URI"),
        (["serve", "models:/m@a", "models:/m@b"], "--name"),
        (["serve", "a", "--api-key-env", "LLMADAPTER_TEST_UNSET_KEY"], "LLMADAPTER_TEST_UNSET_KEY"),
    ],
    ids=["port-range", "body-limit", "negative-grace", "name-count", "duplicate-ids", "unset-key-variable"],
)
def test_bad_arguments_exit_2_before_loading(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture()
def logged_chat(mlflow_store: str, trained_model: Path) -> str:
    import mlflow

    import llmadapter

    with mlflow.start_run():
        llmadapter.log_model(
            str(trained_model),
            name="model",
            task="llm/v1/chat",
            model_config={"temperature": 0, "max_tokens": STORED_MAX_TOKENS},
            registered_model_name="tiny-chat",
        )
    return "models:/tiny-chat/1"


@pytest.mark.slow
def test_serve_a_registered_model_with_an_api_key(logged_chat: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MY_SERVER_KEY": "sk-cli-test"}
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", logged_chat, "--port", str(port)]
    argv += ["--api-key-env", "MY_SERVER_KEY", "--torch-threads", "1"]
    with running(argv, f"{url}/ready", log=tmp_path / "serve.log", env=env) as proc:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-cli-test", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-chat"]
        answer = client.chat.completions.create(
            model="tiny-chat", messages=HELLO, temperature=0, max_tokens=100
        )
        assert answer.choices[0].message.content == TRAINED_ANSWER
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        metrics = httpx.get(f"{url}/metrics").text
        assert (
            'llmadapter_requests_total{model="tiny-chat",route="/v1/chat/completions",status="200"} 1.0'
            in metrics
        )
        traced = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "cli-req-1"})
        assert traced.status_code == 401 and traced.headers["x-request-id"] == "cli-req-1"
    assert proc.returncode == 0
    log = (tmp_path / "serve.log").read_text()
    assert "sk-cli-test" not in log
    # Every line carries the id of the request it was written for ("-": none).
    assert "[cli-req-1] 127.0.0.1" in log and '"GET /v1/models HTTP/1.1" 401' in log
    assert "[-] llmadapter.cli: tiny-chat ready" in log


@pytest.mark.slow
def test_served_model_uses_its_stored_model_config(logged_chat: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", logged_chat, "--port", str(port)]
    with running(argv, f"{url}/ready", log=tmp_path / "serve.log"):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # Logged with model_config temperature 0 and max_tokens 12: greedy and cut at 12 tokens.
        for _ in range(2):
            answer = client.chat.completions.create(model="tiny-chat", messages=HELLO)
            assert answer.usage is not None and answer.usage.completion_tokens == STORED_MAX_TOKENS
            assert answer.choices[0].finish_reason == "length"
            text = answer.choices[0].message.content or ""
            assert text and TRAINED_ANSWER.startswith(text)
        # A request still overrides the stored defaults.
        longer = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=100)
        assert longer.choices[0].message.content == TRAINED_ANSWER


@pytest.mark.slow
def test_serve_exits_1_when_a_model_cannot_load(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "llmadapter.cli", "serve", str(tmp_path / "missing"), "--port", str(port)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=180, env={**os.environ})
    assert result.returncode == 1
    assert "could not load missing" in result.stderr


def _comparable(answer: Any) -> Any:
    """An answer without what differs between two servers run for run (ids, timestamps)."""
    if isinstance(answer, dict):
        return {k: _comparable(v) for k, v in answer.items() if k not in ("id", "created")}
    if isinstance(answer, list):
        return [_comparable(v) for v in answer]
    return answer


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations_like_our_server(logged_chat: str, tmp_path: Path) -> None:
    """`mlflow models serve` runs our pyfunc; our /invocations gives the same answers for the same bodies."""
    ours_port, mlflow_port = free_port(), free_port()
    ours_url, mlflow_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{mlflow_port}"
    # `mlflow models serve` execs `uvicorn` by name, so it needs the virtualenv's bin on PATH, as a user
    # who activated it has (CI runs `.venv/bin/pytest` without activating anything).
    env = {**os.environ, "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"]))}
    ours = [sys.executable, "-m", "llmadapter.cli", "serve", logged_chat, "--port", str(ours_port)]
    ours += ["--torch-threads", "1"]
    theirs = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged_chat, "--env-manager", "local"]
    theirs += ["-h", "127.0.0.1", "-p", str(mlflow_port)]
    bodies = [
        {"messages": HELLO},  # model_config's temperature 0 and max_tokens 12
        {"messages": HELLO, "max_tokens": 5, "stop": ["quick"], "temperature": 0},
        {
            "dataframe_records": [
                # Same keys in every row: MLflow's schema enforcement refuses NaN in an integer column.
                {"messages": HELLO, "max_tokens": 4, "n": 1, "temperature": 0},
                {"messages": HELLO, "max_tokens": 100, "n": 2, "temperature": 0},
            ]
        },
        {"dataframe_split": {"columns": ["messages", "max_tokens", "temperature"], "data": [[HELLO, 3, 0]]}},
        {"inputs": {"messages": HELLO, "max_tokens": 6, "temperature": 0}},
    ]
    with (
        running(theirs, f"{mlflow_url}/ping", log=tmp_path / "mlflow.log", env=env),
        running(ours, f"{ours_url}/ready", log=tmp_path / "ours.log", env=env),
    ):
        for body in bodies:
            expected = httpx.post(f"{mlflow_url}/invocations", json=body, timeout=120)
            got = httpx.post(f"{ours_url}/invocations", json=body, timeout=120)
            assert expected.status_code == got.status_code == 200, (body, expected.text, got.text)
            assert _comparable(got.json()) == _comparable(expected.json()), body
        # Asked to stream, `mlflow models serve` answers whole (our pyfunc's predict); ours streams.
        streamed = {"messages": HELLO, "max_tokens": 5, "temperature": 0, "stream": True}
        whole = httpx.post(f"{mlflow_url}/invocations", json=streamed, timeout=120)
        assert whole.json()["object"] == "chat.completion"
        events = httpx.post(f"{ours_url}/invocations", json=streamed, timeout=120)
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.text.endswith("data: [DONE]\n\n")
        first = httpx.post(f"{mlflow_url}/invocations", json=bodies[0], timeout=120).json()
        assert TRAINED_ANSWER.startswith(first["choices"][0]["message"]["content"])
        assert first["usage"]["completion_tokens"] == STORED_MAX_TOKENS
        assert first["model"] == "tiny-chat"
