"""The LLM judge against a real HTTP endpoint on a loopback port (a stub judge that compares texts)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from llmadapter.errors import EvaluationError
from llmadapter.evaluation import EvaluationSet, JudgeOptions, ScorerSpec
from llmadapter.evaluation.dataset import parse_row
from llmadapter.evaluation.runner import read_scores
from llmadapter.evaluation.scorers import build_scorers

ASK = {"messages": [{"role": "user", "content": "Capital of France?"}]}


class _Judge(BaseHTTPRequestHandler):
    """Says yes when the answer contains the expected answer; counts its calls."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "judge-1", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        prompt = body["messages"][0]["content"]
        expected = prompt.split("Expected answer: ")[1].split("\n")[0]
        answer = prompt.split("\nAnswer: ")[1].split("\n")[0]
        verdict = "yes" if expected.lower() in answer.lower() else "no"
        self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _set() -> EvaluationSet:
    row = parse_row({**ASK, "expected": "Paris"}, "row 1")
    return EvaluationSet(name="s", source="s", source_type="local", digest="d", rows=[row])


def test_the_judge_scores_and_is_named_in_each_assessment(judge_url: str) -> None:
    judge = JudgeOptions(url=judge_url, model="judge-1")
    [planned] = build_scorers([ScorerSpec(name="judge")], _set(), "llm/v1/chat", judge)
    right = planned.scorer(inputs=ASK, outputs="It is Paris.", expectations={"expected": "Paris"})
    wrong = planned.scorer(inputs=ASK, outputs="It is Lyon.", expectations={"expected": "Paris"})
    assert (right.value, wrong.value) == (1.0, 0.0)
    assert right.source.source_id == "judge-1" and right.rationale.startswith("judge-1: yes")
    assert planned.judge_model == "judge-1"
    assert _Judge.calls[-1]["model"] == "judge-1" and _Judge.calls[-1]["temperature"] == 0


def test_a_judge_that_does_not_answer_fails_before_anything_loads() -> None:
    url = _dead_url()
    with pytest.raises(EvaluationError, match=f"the judge at {url} does not answer"):
        build_scorers([ScorerSpec(name="judge")], _set(), "llm/v1/chat", JudgeOptions(url=url, model="j"))


def test_a_judge_model_the_url_does_not_serve(judge_url: str) -> None:
    with pytest.raises(EvaluationError, match=r"serves judge-1, not 'gpt-9'"):
        build_scorers(
            [ScorerSpec(name="judge")], _set(), "llm/v1/chat", JudgeOptions(url=judge_url, model="gpt-9")
        )


def test_a_missing_api_key_variable_is_named(judge_url: str) -> None:
    judge = JudgeOptions(url=judge_url, model="judge-1", api_key_env="LLMADAPTER_NO_SUCH_KEY")
    with pytest.raises(EvaluationError, match="LLMADAPTER_NO_SUCH_KEY is not set"):
        build_scorers([ScorerSpec(name="judge")], _set(), "llm/v1/chat", judge)


def test_a_judge_that_dies_mid_evaluation_fails_it_with_the_url(mlflow_store: str) -> None:
    import mlflow
    import mlflow.genai
    import pandas as pd

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    scorers = build_scorers(
        [ScorerSpec(name="judge")], _set(), "llm/v1/chat", JudgeOptions(url=url, model="judge-1")
    )
    server.shutdown()
    server.server_close()

    frame = pd.DataFrame([{"inputs": ASK, "outputs": "Paris", "expectations": {"expected": "Paris"}}])
    mlflow.set_experiment("judge")
    result = mlflow.genai.evaluate(data=frame, scorers=[s.scorer for s in scorers])
    with pytest.raises(
        EvaluationError, match=f"scorer judge gave no score for row 0 of m: .*the judge at {url} failed"
    ):
        read_scores(result.result_df, scorers, "m")
