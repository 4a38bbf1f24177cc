"""Process start for local flow runs: Prefect's ephemeral API boots while the model stack imports.

Without PREFECT_API_URL, Prefect starts a temporary API server in a subprocess the first time a flow
needs it: 10-25 s on two cores, during which the process only waits. Importing torch, transformers and
MLflow (which the first tasks do anyway) takes about 10 s more. Started together, the two overlap, so the
embedded default pays for the API start only where it outlasts the imports.
"""

from __future__ import annotations

import importlib
import threading

# What the log and register tasks import first; importing it here only moves that cost earlier.
MODEL_STACK = ("torch", "transformers", "mlflow", "mlflow.transformers")


class EphemeralApiStart:
    """The ephemeral API starting on a background thread; `wait()` before the first flow call."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return  # a real server (environment, profile or test harness): nothing to start
        self._thread = threading.Thread(target=self._start, name="prefect-ephemeral-api", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            # A per-process singleton: the flow's own client later finds it running and reuses it.
            SubprocessASGIServer().start()
        except BaseException as exc:  # re-raised on the main thread by wait()
            self.error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error


def start_local_flow_process() -> EphemeralApiStart:
    """Start the ephemeral API in the background, import the model stack meanwhile, and return the start
    (call `wait()` on it before running a flow). The environment must already hold Prefect's settings."""
    api = EphemeralApiStart()
    for module in MODEL_STACK:
        importlib.import_module(module)
    return api
