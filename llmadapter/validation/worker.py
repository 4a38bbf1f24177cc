"""The model under validation: loaded in a fresh worker process (default) or in this one, answering requests.

The worker is `python -m llmadapter.validation --worker FD MODEL_URI`, a clean interpreter (a
multiprocessing spawn would re-import the parent's `__main__`: Prefect and the flow under
`python -m flows.demo`). It loads the model with `mlflow.pyfunc.load_model(uri)` exactly as a user or
`mlflow models serve` would, so a model that only works in the process that logged it (missing code,
unpicklable state, a tokenizer read from a folder that is gone) fails here, before registration.
Parent and worker talk over a socket pair (`multiprocessing.Pipe`) whose worker end the worker inherits
as FD: the worker first sends `Loaded`, then one `Outcome` per request, until the parent hangs up. Its
stdout and stderr go to a file whose tail the error messages quote. It dies with its parent, even one
killed -9 while the worker loads or predicts: SIGTERM from the kernel on Linux (PR_SET_PDEATHSIG), and
everywhere a thread that exits the worker once its parent process is gone.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from llmadapter.errors import LLMAdapterError
from llmadapter.processes import die_with_parent
from llmadapter.settings import mlflow_http_environment

_STOP_WAIT_S = 10.0  # how long a worker that was hung up on may take to exit before it is killed
_PARENT_POLL_S = 0.5  # how often a worker checks that its parent is still alive


class Outcome(BaseModel):
    """What one predict call gave: a response, or the error it raised (never a stack trace)."""

    # NaN and infinities in an answer reach the checks as numbers (and fail them), not as null.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    ok: bool
    response: Any = None
    latency_s: float = 0.0
    error_type: str | None = None
    message: str | None = None
    code: str | None = None
    status_code: int | None = None

    @property
    def error(self) -> str:
        return f"{self.error_type}: {self.message}"


_OUTCOMES = TypeAdapter(list[Outcome])


class ModelFacts(BaseModel):
    """What the loaded model's engine says of itself; nothing for a pyfunc that does not show its engine."""

    task: str | None = None
    context_window: int | None = None
    default_stops: list[str] = Field(default_factory=list)  # the model_config's, applied to every request
    default_response_format: dict[str, Any] | None = None  # the model_config's, for requests without one
    weight_format: dict[str, str] | None = None  # dtype, quantization, device it was loaded with


class Loaded(BaseModel):
    """The worker's first message: how long loading took and the engine's facts, or why loading failed."""

    load_s: float | None = None
    facts: ModelFacts = Field(default_factory=ModelFacts)
    error: Outcome | None = None


def error_outcome(exc: BaseException, latency_s: float) -> Outcome:
    """An Outcome naming the llmadapter error behind `exc` (MLflow may wrap ours), else `exc` itself."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    ours = next((e for e in chain if isinstance(e, LLMAdapterError)), None)
    shown = ours or exc
    return Outcome(
        ok=False,
        latency_s=latency_s,
        error_type=type(shown).__name__,
        message=str(shown)[:2000],
        code=ours.code if ours is not None else None,
        status_code=ours.status_code if ours is not None else None,
    )


def _jsonable(value: Any) -> Any:
    """Predictions may come back as pydantic models, numpy arrays or one-row lists: make them JSON."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def read_facts(loaded: Any) -> ModelFacts:
    """The engine's task, context window and default stops, from our pyfunc's public get_raw_model()."""
    try:
        engine = loaded.get_raw_model()
    except NotImplementedError:  # a pyfunc that does not show its model: nothing is known
        return ModelFacts()
    # Read by attribute: the raw model of a pyfunc that is not ours is anything (MLflow's: a pipeline).
    task = getattr(engine, "inference_task", None)
    window = getattr(engine, "context_window", None)
    stops = getattr(getattr(engine, "config", None), "stop", None)
    fmt = getattr(getattr(engine, "config", None), "response_format", None)
    weights = getattr(engine, "weight_format", None)
    return ModelFacts(
        weight_format=dict(weights) if isinstance(weights, Mapping) else None,
        task=task if isinstance(task, str) else None,
        context_window=window if isinstance(window, int) and window > 0 else None,
        default_stops=list(stops) if isinstance(stops, list | tuple) else [],
        default_response_format=fmt if isinstance(fmt, dict) else None,
    )


class LoadedModel:
    """A pyfunc model loaded in this process, answering one request at a time."""

    def __init__(self, model_uri: str) -> None:
        import mlflow.pyfunc

        start = time.perf_counter()
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.load_s = time.perf_counter() - start
        self.facts = read_facts(self.model)

    def predict(self, request: Mapping[str, Any]) -> Outcome:
        start = time.perf_counter()
        try:
            raw = self.model.predict(dict(request))
            latency = time.perf_counter() - start
            result = _jsonable(raw)
        except Exception as exc:  # any failure of the model is reported as data
            return error_outcome(exc, time.perf_counter() - start)
        if isinstance(result, list) and len(result) == 1:
            result = result[0]
        return Outcome(ok=True, response=result, latency_s=latency)

    def predict_batch(self, requests: list[Mapping[str, Any]]) -> list[Outcome]:
        """All requests in one predict call (one batch for the engine); each row's wall time is the
        batch's. If the batch fails, each request is predicted alone, so every row gets its own answer
        or error."""
        import pandas as pd

        start = time.perf_counter()
        try:
            frame = pd.DataFrame([dict(r) for r in requests]).astype(object)
            raw = self.model.predict(frame.where(frame.notna(), None))
            latency = time.perf_counter() - start
            result = _jsonable(raw)
        except Exception:  # one bad row fails the whole call: answer row by row instead
            return [self.predict(r) for r in requests]
        if not (isinstance(result, list) and len(result) == len(requests)):
            return [self.predict(r) for r in requests]
        return [Outcome(ok=True, response=r, latency_s=latency) for r in result]


def load(model_uri: str) -> tuple[LoadedModel | None, Loaded]:
    """Load a model in this process: the model and what to report, or None and why it did not load."""
    try:
        model = LoadedModel(model_uri)
    except Exception as exc:  # a model that cannot load is a validation result, not a crash
        return None, Loaded(error=error_outcome(exc, 0.0))
    return model, Loaded(load_s=model.load_s, facts=model.facts)


def exit_with_parent(poll_s: float = _PARENT_POLL_S) -> threading.Thread:
    """Exit this process once its parent is gone (it is then re-parented): the fallback where no kernel
    signal does it, and the way out of a load or a prediction that never reads the hung-up channel."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"validation worker: parent process {parent} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    watcher = threading.Thread(target=watch, name="llmadapter-parent-watch", daemon=True)
    watcher.start()
    return watcher


def serve(channel_fd: int, model_uri: str) -> int:
    """The worker process: load the model, say so, then answer each request until the parent hangs up."""
    exit_with_parent()
    with Connection(channel_fd) as conn:
        model, loaded = load(model_uri)
        conn.send_bytes(loaded.model_dump_json().encode())
        if model is None:
            return 1
        while True:
            try:
                request = json.loads(conn.recv_bytes())
            except EOFError:
                return 0
            if isinstance(request, list):  # a batch: one predict call for all of them
                conn.send_bytes(_OUTCOMES.dump_json(model.predict_batch(request)))
            else:
                conn.send_bytes(model.predict(request).model_dump_json().encode())


class Session(Protocol):
    """Predictions for the checks, from a model loaded once."""

    loaded: Loaded

    def predict(self, request: Mapping[str, Any]) -> Outcome: ...

    def predict_batch(self, requests: list[Mapping[str, Any]]) -> list[Outcome]: ...

    def close(self) -> None: ...


class InProcessSession:
    """The model loaded in this process (tests, and flows that are not about the fresh process)."""

    def __init__(self, model_uri: str) -> None:
        self._model, self.loaded = load(model_uri)

    def predict(self, request: Mapping[str, Any]) -> Outcome:
        assert self._model is not None, "predict after a failed load"
        return self._model.predict(request)

    def predict_batch(self, requests: list[Mapping[str, Any]]) -> list[Outcome]:
        assert self._model is not None, "predict after a failed load"
        return self._model.predict_batch(requests)

    def close(self) -> None:
        pass


def child_env() -> dict[str, str]:
    """The worker's environment: ours, with the MLflow stores this process uses, our MLflow HTTP limits
    (a dead tracking server fails its load fast) and our package first."""
    import mlflow

    env = dict(os.environ)
    # The child must see the same stores this process uses, even when they were set in code.
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env["MLFLOW_REGISTRY_URI"] = mlflow.get_registry_uri()
    env.update(mlflow_http_environment(env))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def start_worker(model_uri: str, channel_fd: int, output: IO[str]) -> subprocess.Popen[bytes]:
    """Start the worker process: the one place that decides its command, environment and files.

    Call it from the thread that uses the worker (on Linux the worker gets SIGTERM when it exits).
    """
    return subprocess.Popen(
        [sys.executable, "-m", "llmadapter.validation", "--worker", str(channel_fd), model_uri],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        pass_fds=(channel_fd,),
        env=child_env(),
        preexec_fn=die_with_parent(),
    )


class _Gone(Exception):
    """The worker hung past the deadline or exited; `outcome` says which, for the check that asked."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


class WorkerSession:
    """The model loaded in a fresh worker process, killed when the session runs past its deadline."""

    def __init__(self, model_uri: str, timeout_s: float) -> None:
        self._deadline = time.monotonic() + timeout_s
        # Lives as long as the session (closed in close()), so no context manager.
        self._output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._conn, child_end = multiprocessing.Pipe()
        with child_end:  # closed here once the worker holds it, so its exit reads as end of file
            self._proc = start_worker(model_uri, child_end.fileno(), self._output)
        try:
            self.loaded = Loaded.model_validate_json(self._receive())
        except _Gone as gone:
            self.loaded = Loaded(error=gone.outcome)
        if self.loaded.error is not None:
            self._stop()

    def predict(self, request: Mapping[str, Any]) -> Outcome:
        try:
            self._conn.send_bytes(json.dumps(dict(request)).encode())
            return Outcome.model_validate_json(self._receive())
        except _Gone as gone:
            return gone.outcome
        except OSError:  # the worker is gone (timed out and killed, or exited): nobody reads the request
            return self._exited()

    def predict_batch(self, requests: list[Mapping[str, Any]]) -> list[Outcome]:
        try:
            self._conn.send_bytes(json.dumps([dict(r) for r in requests]).encode())
            return _OUTCOMES.validate_json(self._receive())
        except _Gone as gone:
            return [gone.outcome] * len(requests)
        except OSError:
            return [self._exited()] * len(requests)

    def close(self) -> None:
        self._stop()
        self._output.close()

    def _receive(self) -> bytes:
        try:
            if not self._conn.poll(max(self._deadline - time.monotonic(), 0.001)):
                # Hung (or far too slow): later predictions answer "exited" at once instead of waiting again.
                self._proc.kill()
                self._proc.wait()
                raise _Gone(
                    Outcome(ok=False, error_type="TimeoutError", message="validation process timed out")
                )
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            raise _Gone(self._exited()) from None

    def _exited(self) -> Outcome:
        code = self._wait()
        return Outcome(
            ok=False,
            error_type="ProcessExited",
            message=f"validation process exited with code {code}: {self._output_tail()}",
        )

    def _output_tail(self, n: int = 1500) -> str:
        if self._output.closed:
            return ""
        self._output.seek(0)
        return self._output.read()[-n:]

    def _stop(self) -> None:
        """Hang up: the worker exits at the end of its input (killed if it does not, soon)."""
        self._conn.close()
        self._wait()

    def _wait(self) -> int:
        try:
            return self._proc.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()


@contextlib.contextmanager
def open_session(model_uri: str, *, fresh_process: bool, timeout_s: float) -> Iterator[Session]:
    """A session with the model: in a fresh worker process bounded by timeout_s, or in this process."""
    session: Session = WorkerSession(model_uri, timeout_s) if fresh_process else InProcessSession(model_uri)
    try:
        yield session
    finally:
        session.close()
