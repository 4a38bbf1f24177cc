"""llmadapter.processes with real child processes: Python's own HTTP server and scripts that fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmadapter.errors import LLMAdapterError
from llmadapter.processes import answers, free_port, running


def test_running_yields_once_the_url_answers_and_stops_the_process_after(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)]

    with running(argv, f"http://127.0.0.1:{port}/", log=tmp_path / "server.log") as proc:
        assert answers(f"http://127.0.0.1:{port}/")
        assert proc.poll() is None

    assert proc.returncode is not None
    assert not answers(f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize(
    ("script", "timeout_s", "message"),
    [
        ("print('cannot bind'); raise SystemExit(3)", 60.0, "exited with code 3 at start"),
        ("import time; print('loading'); time.sleep(60)", 1.0, "was not ready after 1.0 s"),
    ],
    ids=["exits-at-start", "never-ready"],
)
def test_a_process_that_does_not_get_ready_fails_quoting_its_log(
    tmp_path: Path, script: str, timeout_s: float, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recording_popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        started.append(popen(*args, **kwargs))  # type: ignore[call-overload]
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    url = f"http://127.0.0.1:{free_port()}/"

    with (
        pytest.raises(LLMAdapterError, match=message) as info,
        running([sys.executable, "-u", "-c", script], url, log=tmp_path / "out.log", timeout_s=timeout_s),
    ):
        raise AssertionError("never ready, never yielded")

    assert script.split("'")[1] in str(info.value)  # the log's tail is in the error
    (proc,) = started
    assert proc.returncode is not None  # stopped, not left running


def test_answers_is_false_where_nothing_listens() -> None:
    assert not answers(f"http://127.0.0.1:{free_port()}/ready", timeout_s=0.5)
