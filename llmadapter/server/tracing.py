"""MLflow traces of served requests: what one holds, and how it is written to the tracking store.

`served_trace` turns an answered request (its RequestContext and the engine work in it) into a plain,
picklable `ServedTrace`, on the observer's thread; `TraceWriter` writes batches of them, in the exporter
process (`llmadapter.server.trace_exporter`), never in the serving one.

Each trace has one span, the request: the served model's name and version, the request id, token usage,
finish reasons, time to first token and latency, and (unless text is left out) the request and the
answer. It is linked to the artifact's LoggedModel through the `mlflow.modelId` trace metadata, as
MLflow 3 links traces to models, so `mlflow.search_traces(model_id=...)` and the model's page in
`mlflow ui` find it; it lands in that model's experiment unless a `tracing_experiment` is set.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmadapter.catalog import CHAT, COMPLETIONS

if TYPE_CHECKING:
    from mlflow.entities import Span, TraceInfo

    from llmadapter.engine.formats import Job
    from llmadapter.request_context import RequestContext

# Where traces of a model with no LoggedModel id go, unless `tracing_experiment` names one.
DEFAULT_EXPERIMENT = "llmadapter-serving"
_PREVIEW_CHARS = 1000
# Request fields that carry prompt text: left out of a trace when text is.
_TEXT_FIELDS = ("messages", "prompt", "suffix", "tools", "input")
# MLflow's span type per task (the UI renders CHAT_MODEL spans as conversations).
_SPAN_TYPES: dict[str, str] = {CHAT: "CHAT_MODEL", COMPLETIONS: "LLM"}


@dataclass(frozen=True)
class ServedTrace:
    """What one trace records, as plain JSON-able values (built on the observer's thread)."""

    request_id: str
    name: str  # the task, e.g. llm/v1/chat
    model: str
    version: str
    model_id: str
    start_ns: int
    end_ns: int
    ok: bool
    attributes: dict[str, Any]
    usage: dict[str, int]
    inputs: Any
    outputs: Any
    request_preview: str | None
    response_preview: str | None


def _choice(task: str, seq: Any, include_text: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": seq.choice_index, "finish_reason": seq.finish_reason or "cancelled"}
    if include_text:
        text = seq.text
        choice |= {"message": {"role": "assistant", "content": text}} if task == CHAT else {"text": text}
    return choice


def _answer(task: str, model: str, job: Job, include_text: bool) -> dict[str, Any]:
    seqs = sorted(job.seqs, key=lambda s: s.choice_index)
    return {
        "id": job.id,
        "model": model,
        "choices": [_choice(task, s, include_text) for s in seqs],
        "usage": job.usage().model_dump(),
    }


def _request(job: Job, include_text: bool) -> dict[str, Any]:
    body = job.request.model_dump(mode="json", exclude_none=True)
    return body if include_text else {k: v for k, v in body.items() if k not in _TEXT_FIELDS}


def _preview(job: Job) -> tuple[str, str]:
    """What the traces table shows: the last message (or first prompt) and the first choice's text."""
    request: Any = job.request
    messages = getattr(request, "messages", None)
    asked = job.prompt_texts[0] if messages is None else str(messages[-1].content or "")
    answered = job.seqs[0].text if job.seqs else ""
    return asked[:_PREVIEW_CHARS], answered[:_PREVIEW_CHARS]


def _one_or_all(items: list[Any]) -> Any:
    # One request (the /v1 routes) is recorded as itself; an /invocations batch as the list of its rows.
    return items[0] if len(items) == 1 else items


def served_trace(context: RequestContext, include_text: bool) -> ServedTrace | None:
    """The trace of an answered request, or None when no generation engine worked for it."""
    if not context.work:
        return None
    engine = context.work[0][0]
    jobs = [job for _, job in context.work]
    seqs = [seq for job in jobs for seq in job.seqs]
    task = engine.inference_task
    prompt = sum(job.prompt_tokens for job in jobs)
    completion = sum(len(seq.generated) for seq in seqs)
    usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}
    end = context.end if context.end is not None else context.start
    firsts = [seq.times.first_token for seq in seqs if seq.times.first_token is not None]
    status = context.status or 500
    attributes = {
        "llmadapter.request_id": context.id,
        "llmadapter.route": context.path,
        "llmadapter.model": engine.model_name,
        "llmadapter.model_version": engine.model_version,
        "llmadapter.model_id": engine.model_id,
        "llmadapter.status_code": status,
        "llmadapter.stream": context.streamed,
        "llmadapter.finish_reasons": [seq.finish_reason or "cancelled" for seq in seqs],
        "llmadapter.latency_s": end - context.start,
        "llmadapter.ttft_s": min(firsts) - context.start if firsts else None,
    }
    asked, answered = _preview(jobs[0]) if include_text else (None, None)
    return ServedTrace(
        request_id=context.id,
        name=task,
        model=engine.model_name,
        version=engine.model_version,
        model_id=engine.model_id,
        start_ns=context.started_ns,
        end_ns=context.started_ns + int((end - context.start) * 1e9),
        ok=status < 400 and all(seq.error is None for seq in seqs),
        attributes=attributes,
        usage=usage,
        inputs=_one_or_all([_request(job, include_text) for job in jobs]),
        outputs=_one_or_all([_answer(task, engine.model_name, job, include_text) for job in jobs]),
        request_preview=asked,
        response_preview=answered,
    )


def _span(trace: ServedTrace, trace_id: str, otel_trace_id: int) -> Span:
    """The request's one span, as MLflow stores spans (OpenTelemetry, JSON-encoded attributes)."""
    from mlflow.entities import Span
    from mlflow.tracing.constant import SpanAttributeKey
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    attributes = {
        SpanAttributeKey.REQUEST_ID: trace_id,
        SpanAttributeKey.SPAN_TYPE: _SPAN_TYPES.get(trace.name, "LLM"),
        SpanAttributeKey.INPUTS: trace.inputs,
        SpanAttributeKey.OUTPUTS: trace.outputs,
        SpanAttributeKey.CHAT_USAGE: trace.usage,
        **trace.attributes,
    }
    context = SpanContext(otel_trace_id, random.getrandbits(64), is_remote=False, trace_flags=TraceFlags(1))
    status = (
        Status(StatusCode.OK)
        if trace.ok
        else Status(StatusCode.ERROR, f"HTTP {trace.attributes['llmadapter.status_code']}")
    )
    otel = ReadableSpan(
        name=trace.name,
        context=context,
        attributes={k: json.dumps(v) for k, v in attributes.items() if v is not None},
        start_time=trace.start_ns,
        end_time=trace.end_ns,
        status=status,
        kind=SpanKind.SERVER,
        resource=Resource({"service.name": "llmadapter"}),
    )
    return Span(otel)


def _info(trace: ServedTrace, trace_id: str, experiment_id: str) -> TraceInfo:
    from mlflow.entities import TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import (
        TRACE_SCHEMA_VERSION,
        TRACE_SCHEMA_VERSION_KEY,
        TraceMetadataKey,
        TraceTagKey,
    )

    metadata = {
        TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
        TraceMetadataKey.TOKEN_USAGE: json.dumps(trace.usage),
    }
    if trace.model_id:
        metadata[TraceMetadataKey.MODEL_ID] = trace.model_id
    return TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=trace.start_ns // 1_000_000,
        execution_duration=(trace.end_ns - trace.start_ns) // 1_000_000,
        state=TraceState.OK if trace.ok else TraceState.ERROR,
        request_preview=trace.request_preview,
        response_preview=trace.response_preview,
        client_request_id=trace.request_id,
        trace_metadata=metadata,
        tags={
            TraceTagKey.TRACE_NAME: trace.name,
            "llmadapter.model": trace.model,
            "llmadapter.model_version": trace.version,
        },
    )


class TraceWriter:
    """Writes batches of ServedTraces to the tracking store at `tracking_uri` (in the exporter process)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracing.client import TracingClient

        self._uri = tracking_uri
        self._experiment = experiment
        self._client = TracingClient(tracking_uri)
        self._experiments: dict[str, str] = {}  # model id ("" for none) -> experiment id

    def write(self, batch: list[ServedTrace]) -> None:
        """Write every trace of `batch` (raises what the store raised). Spans go to the tracking store
        itself: a database (SQLite by default) or an `mlflow server` in front of one."""
        by_experiment: dict[str, list[ServedTrace]] = defaultdict(list)
        for trace in batch:
            by_experiment[self._experiment_for(trace.model_id)].append(trace)
        for experiment_id, traces in by_experiment.items():
            written = []
            for trace in traces:
                otel_id = random.getrandbits(128)
                trace_id = f"tr-{otel_id:032x}"
                written.append((trace, trace_id, _span(trace, trace_id, otel_id)))
            # Trace infos first, then one call for the batch's spans: the other order makes the SQL
            # store merge each info into the row log_spans created (13 ms of CPU a trace instead of 8).
            for trace, trace_id, _ in written:
                self._client.start_trace(_info(trace, trace_id, experiment_id))
            self._client.log_spans(experiment_id, [span for _, _, span in written])

    def _experiment_for(self, model_id: str) -> str:
        """The experiment a model's traces go to: `tracing_experiment`, else its LoggedModel's."""
        key = "" if self._experiment else model_id
        found = self._experiments.get(key)
        if found is None:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self._uri)
            if key:
                found = client.get_logged_model(model_id).experiment_id
            else:
                name = self._experiment or DEFAULT_EXPERIMENT
                experiment = client.get_experiment_by_name(name)
                found = experiment.experiment_id if experiment else client.create_experiment(name)
            self._experiments[key] = found
        return found
