"""Changing the registry version a served name answers with, without a failed request.

`Swapper` owns one served name of a `ServedModels`: its first load, and each later version swapped in.

- overlap (default): the new version loads beside the serving one and answers a smoke request through
  its engine; then `ServedModels.switch` puts it under the name (on the event loop: requests admitted
  after that get it, requests already running keep the old engine, streams included), and a retiring
  thread closes the old engine once no request holds it, and gives its memory back.
- drain (hosts that cannot hold two copies): new requests for the name wait (they are not refused),
  running ones finish, the old engine is closed and freed, the new version loads and warms, then it is
  switched in and the waiting requests go on. If the new version fails, the old one is loaded again.

A version is refused before loading when its registry tags say validation failed or that it serves
another task; a version that fails to load, warm or answer is never switched in: the current one keeps
answering, and the failure is kept in the name's `ServingState` (shown by /ready, /v1/models, /metrics).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llmadapter.config import WeightFormat
from llmadapter.engine.base import Engine
from llmadapter.errors import LLMAdapterError, NotFoundError
from llmadapter.names import registered_name
from llmadapter.registry import TAG_TASK, TAG_VALIDATION
from llmadapter.server.served import ServedModels

log = logging.getLogger("llmadapter.swap")

Strategy = Literal["overlap", "drain"]
# A request as small as a task allows: it proves the engine generates (or embeds) before it serves.
_SMOKE: dict[str, dict[str, Any]] = {
    "llm/v1/chat": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1},
    "llm/v1/completions": {"prompt": "Hello", "max_tokens": 1},
    "llm/v1/embeddings": {"input": "Hello"},
}
_IDLE_POLL_S = 0.05


class SwapRefused(LLMAdapterError):
    """A version the registry says must not be served here (validation failed, another task)."""


class AliasMissing(NotFoundError):
    """The followed alias no longer exists in the registry."""


@dataclass(frozen=True)
class Target:
    """One thing to serve: its registry version ("" outside the registry), a URI loading exactly it."""

    uri: str
    version: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)


def parse_registry_uri(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of a models:/ URI (one of alias/version set), or None for other URIs."""
    name = registered_name(model_uri)
    if name is None:
        return None
    rest = model_uri.removeprefix("models:/").lstrip("/")[len(name) :]
    if rest.startswith("@"):
        return name, rest[1:], None
    return name, None, rest.lstrip("/") or None


def resolve(model_uri: str) -> Target:
    """What `model_uri` names now: models:/NAME@ALIAS -> the version the alias points at (loaded as
    models:/NAME/N, so a move during the download cannot mix versions); models:/NAME/N -> version N; any
    other URI as it is. AliasMissing when the alias is gone; MLflow's errors when the registry fails."""
    parsed = parse_registry_uri(model_uri)
    if parsed is None:
        return Target(uri=model_uri)
    name, alias, version = parsed
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if alias is not None:
        try:
            found = client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise AliasMissing(f"models:/{name}@{alias} does not exist in the registry.") from exc
            raise
    elif version is not None and version.isdigit():
        found = client.get_model_version(name, version)
    else:  # models:/NAME/latest, stages: MLflow resolves them at download
        return Target(uri=model_uri)
    return Target(uri=f"models:/{name}/{found.version}", version=str(found.version), tags=dict(found.tags))


def smoke(engine: Engine) -> None:
    """Answer one tiny request through the engine; raises when it cannot."""
    task = engine.inference_task
    answer = engine.run([engine.parse({"model": engine.model_name, **_SMOKE[task]})])[0]
    if not (getattr(answer, "choices", None) or getattr(answer, "data", None)):
        raise RuntimeError(f"the smoke request got an empty answer: {answer}")


def free_memory() -> None:
    """Give a closed engine's memory back: Python's, the CUDA cache, and glibc's free lists to the OS."""
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _default_loader(target: Target, name: str, weight_format: WeightFormat | None = None) -> Engine:
    from llmadapter.mlflow_model import load_engine

    return load_engine(target.uri, model_name=name, weight_format=weight_format)


class Swapper:
    """The engine behind one served name: loads the first version and swaps in later ones."""

    def __init__(
        self,
        served: ServedModels,
        name: str,
        *,
        strategy: Strategy = "overlap",
        loader: Callable[[Target, str], Engine] | None = None,
        drain_timeout_s: float = 3600.0,
        weight_format: WeightFormat | None = None,
    ) -> None:
        self.served = served
        self.name = name
        self.strategy = strategy
        # Every version of this name loads in the server's weight format (dtype, quantization, device).
        self._loader = loader or functools.partial(_default_loader, weight_format=weight_format)
        self._drain_timeout_s = drain_timeout_s
        self._current: Target | None = None
        self._lock = threading.Lock()  # one swap at a time
        self._retiring: list[threading.Thread] = []

    @property
    def current(self) -> Target | None:
        return self._current

    def _load(self, target: Target) -> Engine:
        started = time.perf_counter()
        engine = self._loader(target, self.name)
        engine.model_version = target.version
        try:
            smoke(engine)
        except BaseException:
            engine.close()
            raise
        log.info(
            "%s: version %s loaded and warmed in %.2f s",
            self.name,
            target.version or target.uri,
            time.perf_counter() - started,
        )
        return engine

    def load_first(self, target: Target) -> Engine:
        """Load and serve the first version (the server's start; raises when it cannot)."""
        with self._lock:
            engine = self._load(target)
            self.served.add(engine)
            self._current = target
            log.info("%s: serving version %s", self.name, target.version or target.uri)
            return engine

    def refusal(self, target: Target) -> str | None:
        """Why `target` must not be served here, from its registry tags (None: it may be)."""
        if target.tags.get(TAG_VALIDATION) == "failed":
            return f"version {target.version}: its validation failed (tag {TAG_VALIDATION}=failed)"
        engine = self.served.engines.get(self.name)
        task = target.tags.get(TAG_TASK)
        if engine is not None and task and task != engine.inference_task:
            return f"version {target.version} serves {task}, this name serves {engine.inference_task}"
        return None

    def swap(self, target: Target) -> bool:
        """Serve `target` instead of the current version; False (the current one still answers, the
        reason in the state) when it was refused or failed."""
        with self._lock:
            state = self.served.state(self.name)
            why = self.refusal(target)
            if why is not None:
                state.swap_failure = why
                state.swap_refusals += 1
                log.warning("%s: refused %s; version %s keeps serving", self.name, why, state.version)
                return False
            state.swapping_to = target.version
            started = time.perf_counter()
            try:
                ok = self._overlap(target) if self.strategy == "overlap" else self._drain(target)
            finally:
                state.swapping_to = None
            if ok:
                state.swap_failure = None
                state.swap_seconds = time.perf_counter() - started
                self._current = target
            return ok

    def _failed(self, target: Target, exc: BaseException) -> None:
        state = self.served.state(self.name)
        state.swap_failure = f"version {target.version}: {type(exc).__name__}: {exc}"[:500]
        state.swap_failures += 1
        log.error(
            "%s: version %s could not be swapped in (%s: %s); version %s keeps serving",
            self.name,
            target.version,
            type(exc).__name__,
            exc,
            state.version,
        )

    def _overlap(self, target: Target) -> bool:
        try:
            engine = self._load(target)
            old = self.served.engines.get(self.name)
            if old is not None and engine.inference_task != old.inference_task:
                engine.close()
                raise SwapRefused(f"it serves {engine.inference_task}, this name serves {old.inference_task}")
        except Exception as exc:
            self._failed(target, exc)
            free_memory()
            return False
        replaced = self.served.switch(engine)
        log.info("%s: version %s serves now (was %s)", self.name, target.version, _version(replaced))
        if replaced is not None:
            self._retire(replaced)
        return True

    def _drain(self, target: Target) -> bool:
        old = self.served.engines.get(self.name)
        self.served.pause(self.name)  # new requests wait from here
        try:
            if old is not None:
                self._wait_idle(old)
                old.close()
                free_memory()
            try:
                engine = self._load(target)
                ok = True
            except Exception as exc:
                self._failed(target, exc)
                if self._current is None:
                    raise
                log.info("%s: loading version %s again", self.name, self._current.version)
                engine = self._load(self._current)
                ok = False
            replaced = self.served.switch(engine)
            if ok:
                log.info("%s: version %s serves now (was %s)", self.name, target.version, _version(replaced))
            return ok
        finally:
            self.served.resume(self.name)

    def _wait_idle(self, engine: Engine) -> None:
        """Until no request holds `engine` (bounded by drain_timeout_s; then it is closed anyway)."""
        deadline = time.monotonic() + self._drain_timeout_s
        while self.served.in_use(engine) and time.monotonic() < deadline:
            time.sleep(_IDLE_POLL_S)

    def _retire(self, engine: Engine) -> None:
        """Close `engine` once the requests holding it are done, off the caller's thread."""

        def close_when_idle() -> None:
            self._wait_idle(engine)
            engine.close()
            free_memory()
            log.info("%s: version %s closed and freed", self.name, _version(engine))

        thread = threading.Thread(target=close_when_idle, name=f"llmadapter-retire-{self.name}", daemon=True)
        self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]
        thread.start()

    def close(self) -> None:
        """Close the serving engine and wait (briefly) for retiring ones."""
        with self._lock:
            for thread in self._retiring:
                thread.join(timeout=5)
            engine = self.served.engines.get(self.name)
            if engine is not None:
                engine.close()


def _version(engine: Engine | None) -> str:
    if engine is None:
        return "-"
    return engine.model_version or "?"
