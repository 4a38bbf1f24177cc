"""The scheduler stamps each sequence's life (queued, scheduled, every token, finished) for observers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import transformers

from llmadapter.catalog import get_task
from llmadapter.config import ModelConfig
from llmadapter.engine.generation import GenerationEngine
from llmadapter.engine.timing import SequenceTimes
from llmadapter.protocol import ChatCompletionRequest, parse_request
from llmadapter.request_context import RequestContext, bind, current_request, unbind
from llmadapter.testing import TRAINED_ANSWER

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine(trained_model: Path) -> GenerationEngine:
    model = transformers.AutoModelForCausalLM.from_pretrained(trained_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(trained_model)
    engine = GenerationEngine(
        model, tokenizer, spec=get_task("llm/v1/chat"), config=ModelConfig(temperature=0), model_name="t"
    )
    yield engine
    engine.close()


def _served(engine: GenerationEngine, *bodies: dict) -> RequestContext:
    """Answer `bodies` concurrently inside one served request, as the server's middleware binds it."""

    async def serve() -> RequestContext:
        context = RequestContext("req-1")
        token = bind(context)
        try:
            requests = [parse_request(ChatCompletionRequest, b) for b in bodies]
            answers = await asyncio.gather(*(engine.arun(r) for r in requests))
        finally:
            unbind(token)
        assert answers[0].choices[0].message.content == TRAINED_ANSWER  # type: ignore[attr-defined]
        return context

    return asyncio.run(serve())


def test_a_served_request_records_its_work_with_ordered_timestamps(engine: GenerationEngine) -> None:
    context = _served(engine, {"messages": HELLO, "n": 2}, {"messages": HELLO, "max_tokens": 3})
    assert [(e, len(job.seqs)) for e, job in context.work] == [(engine, 2), (engine, 1)]
    for _, job in context.work:
        for seq in job.seqs:
            t = seq.times
            assert seq.request_id == "req-1"
            assert t.arrival == context.start  # the request's arrival, not the engine's
            assert t.queued is not None and t.scheduled is not None and t.finished is not None
            assert t.first_token is not None and t.last_token is not None
            assert t.arrival <= t.queued <= t.scheduled <= t.first_token <= t.last_token <= t.finished
            # One stamp per token the model produced: the answer's tokens, plus EOS when it stopped.
            produced = len(seq.generated) + (seq.finish_reason == "stop")
            assert len(t.gaps) == produced - 1
            assert sum(t.gaps) == pytest.approx(t.last_token - t.first_token)
    assert [seq.finish_reason for _, job in context.work for seq in job.seqs] == ["stop", "stop", "length"]


def test_outside_a_served_request_nothing_is_recorded(engine: GenerationEngine) -> None:
    assert current_request() is None
    request = parse_request(ChatCompletionRequest, {"messages": HELLO})
    assert engine.run([request])[0].choices[0].message.content == TRAINED_ANSWER  # type: ignore[attr-defined]


def test_token_stamps_give_first_last_and_gaps() -> None:
    times = SequenceTimes(arrival=1.0)
    for now in (2.0, 2.5, 3.5):
        times.token(now)
    assert (times.first_token, times.last_token, times.gaps) == (2.0, 3.5, [0.5, 1.0])
