"""flows/_startup.py: the ephemeral API starts beside the model-stack imports, once, and flows use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from flows._startup import MODEL_STACK, start_local_flow_process

    api = start_local_flow_process()
    assert api._thread is not None, "no API configured: the ephemeral one must start"
    assert all(name in sys.modules for name in MODEL_STACK)
    api.wait()

    from prefect import flow, get_client
    from prefect.server.api.server import SubprocessASGIServer

    @flow
    def api_of_this_run() -> str:
        with get_client(sync_client=True) as client:
            return str(client.api_url)

    started = SubprocessASGIServer()  # the per-process singleton the background thread started
    assert started.server_process is not None and started.server_process.poll() is None
    print("same api", api_of_this_run().rstrip("/") == started.api_url.rstrip("/"))
    """
)


@pytest.mark.slow
def test_flows_run_on_the_api_started_beside_the_imports(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "PREFECT_PROFILE"}
    env.update(PREFECT_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same api True" in result.stdout, result.stdout  # the flow ran on the API started early


def test_nothing_starts_when_an_api_is_configured() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows._startup import EphemeralApiStart

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        api = EphemeralApiStart()
    assert api._thread is None
    api.wait()  # returns at once
