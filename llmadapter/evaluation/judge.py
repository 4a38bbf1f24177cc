"""The optional LLM judge: an OpenAI-compatible chat endpoint asked whether each answer is right.

The judge model is named in every assessment (its source id) and in the results. It is asked once
before any model under evaluation loads (`GET {url}/models`), so a URL that does not answer fails
the gate's preparation with the URL in the message; a call that fails later fails the evaluation the
same way (the scorer's error, with the URL, is what the evaluation reports).
"""

from __future__ import annotations

import os
from typing import Any

from llmadapter.errors import EvaluationError
from llmadapter.evaluation.options import JudgeOptions

_PROMPT = """You grade an assistant's answer. Reply with one word: yes if the answer is correct{ref}, \
no otherwise.

Question: {question}
{expected}Answer: {answer}
Correct?"""


def _headers(judge: JudgeOptions) -> dict[str, str]:
    if judge.api_key_env is None:
        return {}
    key = os.environ.get(judge.api_key_env)
    if not key:
        raise EvaluationError(
            f"quality.judge.api_key_env: the environment variable {judge.api_key_env} is not set.",
            param="quality.judge.api_key_env",
        )
    return {"Authorization": f"Bearer {key}"}


def _url(judge: JudgeOptions, route: str) -> str:
    return judge.url.rstrip("/") + route


def probe_judge(judge: JudgeOptions) -> None:
    """Fail now, naming the URL, when the judge's API does not answer or does not serve its model."""
    import httpx

    url = _url(judge, "/models")
    try:
        answer = httpx.get(url, headers=_headers(judge), timeout=min(judge.timeout_s, 10.0))
        answer.raise_for_status()
        served = [m.get("id") for m in answer.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise EvaluationError(
            f"quality.judge.url: the judge at {judge.url} does not answer ({url}: {exc}).",
            param="quality.judge.url",
        ) from None
    if served and judge.model not in served:
        raise EvaluationError(
            f"quality.judge.model: {judge.url} serves {', '.join(map(str, served))}, not {judge.model!r}.",
            param="quality.judge.model",
        )


def _question(inputs: dict[str, Any]) -> str:
    messages = inputs.get("messages")
    if isinstance(messages, list) and messages:
        return str(messages[-1].get("content", ""))
    return str(inputs.get("prompt", ""))


def ask_judge(judge: JudgeOptions, question: str, answer: str, expected: str | None) -> tuple[bool, str]:
    """The judge's verdict on one answer and its raw reply; EvaluationError (with the URL) if it fails."""
    import httpx

    prompt = _PROMPT.format(
        ref=" (it matches the expected answer)" if expected else "",
        question=question,
        expected=f"Expected answer: {expected}\n" if expected else "",
        answer=answer,
    )
    body = {
        "model": judge.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 8,
    }
    url = _url(judge, "/chat/completions")
    try:
        reply = httpx.post(url, json=body, headers=_headers(judge), timeout=judge.timeout_s)
        reply.raise_for_status()
        text = str(reply.json()["choices"][0]["message"]["content"] or "")
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise EvaluationError(
            f"the judge at {judge.url} failed ({url}: {exc})", param="quality.judge.url"
        ) from None
    return text.strip().lower().startswith("yes"), text.strip()


def build_judge(judge: JudgeOptions, where: str) -> Any:
    """The `judge` scorer: 1 when the judge says yes, with its reply and model as the assessment's source."""
    from mlflow.entities import AssessmentSource, Feedback
    from mlflow.genai.scorers import scorer

    from llmadapter.evaluation.scorers import answer_text

    probe_judge(judge)
    source = AssessmentSource(source_type="LLM_JUDGE", source_id=judge.model)

    def run(inputs: Any, outputs: Any, expectations: Any) -> Feedback:
        if isinstance(outputs, dict) and "error" in outputs:
            return Feedback(
                value=0.0, rationale=f"prediction failed: {outputs['error']}"[:500], source=source
            )
        verdict, reply = ask_judge(
            judge, _question(inputs or {}), answer_text(outputs), (expectations or {}).get("expected")
        )
        return Feedback(
            value=1.0 if verdict else 0.0, rationale=f"{judge.model}: {reply}"[:500], source=source
        )

    return scorer(run, name="judge")
