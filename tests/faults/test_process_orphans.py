"""A process killed -9 takes its validation worker with it: no orphan keeps loading or holding a model.

The parent is a real Python process that starts the worker exactly as validation does
(`llmadapter.validation.worker.start_worker`), on a model whose loading never ends (the worker is busy,
not reading its channel, so the hung-up channel alone would not end it); the test kills the parent -9.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MARKER_ENV = "LLMADAPTER_TEST_LOADING_MARKER"

PARENT = textwrap.dedent(
    """
    import multiprocessing, sys
    from llmadapter.validation import worker

    if sys.argv[2] == "parent-watch":  # only the worker's own check of its parent is left
        worker.die_with_parent = lambda: None
    conn, child_end = multiprocessing.Pipe()
    with child_end, open(sys.argv[3], "w") as output:
        proc = worker.start_worker(sys.argv[1], child_end.fileno(), output)
    print(proc.pid, flush=True)
    conn.recv_bytes()  # the worker never answers: its model never finishes loading
    """
)


def _load_pyfunc(data_path: str, model_config: Any = None) -> None:
    """MLflow's loader hook of the never-loading model: says it started, then loads forever."""
    Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie that nobody reaped yet has exited: it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(check: Callable[[], bool], message: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def never_loads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("never-loads")
    (root / "data.txt").write_text("unused")
    mlflow.pyfunc.save_model(root / "model", loader_module=__name__, data_path=str(root / "data.txt"))
    return root / "model"


@pytest.mark.parametrize("mechanism", ["pdeathsig", "parent-watch"])
def test_a_worker_dies_with_its_parent_killed_9_while_it_loads(
    never_loads: Path, tmp_path: Path, mechanism: str
) -> None:
    marker = tmp_path / "loading"
    env = {**os.environ, MARKER_ENV: str(marker), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", PARENT, str(never_loads), mechanism, str(tmp_path / "worker.log")]
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    worker_pid = 0
    try:
        assert parent.stdout is not None
        worker_pid = int(parent.stdout.readline())
        _wait_until(marker.exists, "the worker to be loading the model", timeout_s=120)
        assert int(marker.read_text()) == worker_pid and _alive(worker_pid)

        parent.send_signal(signal.SIGKILL)  # no finally block, no atexit hook runs
        parent.wait(timeout=10)

        _wait_until(lambda: not _alive(worker_pid), "the orphaned worker to exit", timeout_s=5)
    finally:
        parent.kill()
        parent.wait()
        if worker_pid and _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
    if mechanism == "parent-watch":
        assert "parent process" in (tmp_path / "worker.log").read_text()
