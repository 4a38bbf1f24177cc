"""Where the time of a log-and-validate run goes: Prefect overhead vs download, log, validate, register.

    python bench/flow.py [--model-dir FOLDER] [--in-process-validation] [--skip-processes]

Two measurements, both on the embedded default (Prefect's ephemeral API, SQLite MLflow store in a temp
dir) and a tiny model built here:

1. Whole processes, as `make run` starts one: a fresh Python process that runs the log-and-validate flow
   (it starts the ephemeral API, overlapped with the model-stack imports by flows/_startup.py) against a
   fresh process that makes the same four llmadapter calls without Prefect. Prefect's overhead is the
   difference in wall time, as a share of the flow process's. Also shown: the flow process without the
   overlap, and the first flow process on a brand-new Prefect database.
2. In one process, API already up: the flow twice (another model_config the second time, so it really
   logs again); task durations come from the Prefect API and the overhead is the flow's wall time minus
   the time spent inside the tasks.

Target: Prefect's overhead under 30% of the total.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Task-run name prefixes (tasks/ sets task_run_name; others are "<task name>-<suffix>") -> phase.
PHASES = (
    ("download ", "download"),
    ("log ", "log"),
    ("validate ", "validate"),
    ("publish-report", "validate"),
    ("find-registered-version", "register"),
    ("register ", "register"),
    ("set @", "register"),
    ("get-version", "register"),
)


def _phase_times(flow_run_id: object) -> dict[str, float]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out = dict.fromkeys(("download", "log", "validate", "register"), 0.0)
    for run in runs:
        if run.start_time is None or run.end_time is None:
            continue
        phase = next((p for prefix, p in PHASES if run.name.startswith(prefix)), None)
        if phase is not None:
            out[phase] += (run.end_time - run.start_time).total_seconds()
    return out


def _print_row(label: str, wall: float, phases: dict[str, float]) -> None:
    inside = sum(phases.values())
    overhead = wall - inside
    cells = "  ".join(f"{name} {seconds:6.2f}s" for name, seconds in phases.items())
    share = 100 * overhead / wall
    print(f"{label:<18} wall {wall:6.2f}s  prefect overhead {overhead:6.2f}s ({share:4.1f}%)  {cells}")


def _plain(model_dir: str, fresh_process: bool) -> dict[str, float]:
    """The same four steps as direct llmadapter calls (no Prefect)."""
    import mlflow

    import llmadapter
    from llmadapter import registry
    from llmadapter.settings import configure_mlflow
    from llmadapter.source import resolve_source
    from llmadapter.validation import log_report, validate_model

    times: dict[str, float] = {}
    start = time.perf_counter()
    resolved = resolve_source(model_dir)
    times["download"] = time.perf_counter() - start
    start = time.perf_counter()
    configure_mlflow()
    config = llmadapter.ModelConfig(temperature=0.7)
    with mlflow.start_run() as run:
        info = llmadapter.log_model(
            str(resolved.local_dir), name="model", task="llm/v1/chat", model_config=config
        )
    times["log"] = time.perf_counter() - start
    start = time.perf_counter()
    report = validate_model(info.model_uri, fresh_process=fresh_process)
    log_report(report, run.info.run_id)
    times["validate"] = time.perf_counter() - start
    start = time.perf_counter()
    version, _ = registry.register_version(
        info.model_uri,
        "bench-plain",
        source=model_dir,
        revision=resolved.revision,
        task="llm/v1/chat",
        config_hash=config.digest(),
        report=report,
    )
    registry.set_alias("bench-plain", "challenger", version.version)
    times["register"] = time.perf_counter() - start
    return times


def _environment(tmp: Path, prefect_home: Path) -> dict[str, str]:
    """Prefect reads its settings at import: everything is set before the first prefect import."""
    env = {
        "PREFECT_HOME": str(prefect_home),
        "LLMADAPTER_DATA_DIR": str(tmp / "data"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    prefect_home.mkdir(parents=True, exist_ok=True)
    return env


def _child(kind: str, model_dir: str, fresh: bool) -> None:
    """One whole-process run (`--child`): the flow with or without the early API start, or plain calls."""
    sys.path.insert(0, str(ROOT))
    if kind == "plain":
        _plain(model_dir, fresh)
        return
    if kind == "flow":
        from flows._startup import start_local_flow_process

        start_local_flow_process().wait()
    from flows.log_and_validate import log_and_validate
    from llmadapter.config import ModelConfig
    from tasks.validate import ValidationOptions

    state = log_and_validate(
        source=model_dir,
        model_name="bench",
        config=ModelConfig(temperature=0.7),  # what _plain logs
        validation=ValidationOptions(fresh_process=fresh),
        return_state=True,
    )
    assert state.is_completed(), state.message


def _process_wall(kind: str, model_dir: str, fresh: bool, tmp: Path, prefect_home: Path) -> float:
    """Wall time of a fresh `python bench/flow.py --child KIND` from spawn to exit."""
    tmp.mkdir(parents=True)
    env = {**os.environ, **_environment(tmp, prefect_home)}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        env.pop(var, None)
    argv = [sys.executable, __file__, "--child", kind, "--model-dir", str(Path(model_dir).resolve())]
    argv += [] if fresh else ["--in-process-validation"]
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"--child {kind} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return wall


def _processes(model_dir: str, fresh: bool, tmp: Path) -> None:
    home = tmp / "prefect-processes"
    walls: dict[str, list[float]] = {"plain": [], "flow": [], "flow-late-api": []}
    first = _process_wall("flow", model_dir, fresh, tmp / "p-first", home)  # creates Prefect's database
    # Interleaved, twice each: a slow moment of the machine does not land on one side only.
    for i in range(2):
        for kind in walls:
            walls[kind].append(_process_wall(kind, model_dir, fresh, tmp / f"p-{kind}-{i}", home))
    best = {kind: min(values) for kind, values in walls.items()}
    plain = best["plain"]
    print("\nwhole processes (fresh interpreter to exit, best of 2):")
    print(f"  plain llmadapter calls                   {plain:6.2f}s")
    for label, wall in (
        ("flow, API started early (make run)", best["flow"]),
        ("flow, API started at the first flow call", best["flow-late-api"]),
        ("flow, first run on a new Prefect database", first),
    ):
        share = 100 * (wall - plain) / wall
        print(f"  {label:<41}{wall:6.2f}s  Prefect overhead {wall - plain:6.2f}s ({share:4.1f}%)")
    share = 100 * (best["flow"] - plain) / best["flow"]
    print(f"\nwhole process: Prefect overhead {share:.1f}% of the total (target < 30%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="Model folder (default: a tiny GPT-2 built here).")
    parser.add_argument("--in-process-validation", action="store_true", help="Skip the fresh process.")
    parser.add_argument("--skip-processes", action="store_true", help="Only the in-process measurement.")
    parser.add_argument("--child", choices=["flow", "flow-late-api", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    fresh = not args.in_process_validation
    if args.child:
        _child(args.child, args.model_dir, fresh)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="llmadapter-bench-flow-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    os.environ.update(_environment(tmp, tmp / "prefect"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        os.environ.pop(var, None)
    sys.path.insert(0, str(ROOT))

    from llmadapter.testing import build_tiny_model

    model_dir = args.model_dir or str(build_tiny_model(tmp / "tiny-gpt2", "gpt2"))
    print(f"log-and-validate on {model_dir} (validation in {'a fresh process' if fresh else 'this process'})")
    if not args.skip_processes:
        _processes(model_dir, fresh, tmp)

    # One-time costs of the embedded default, timed apart so the runs below show the per-run overhead.
    from prefect import get_client

    from flows.log_and_validate import log_and_validate
    from llmadapter.config import ModelConfig
    from llmadapter.settings import configure_mlflow
    from tasks.validate import ValidationOptions

    start = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.api_healthcheck()
    api_start = time.perf_counter() - start
    start = time.perf_counter()
    configure_mlflow()
    store_init = time.perf_counter() - start
    rows = []
    for label, config in (("first run", ModelConfig()), ("second run", ModelConfig(temperature=0.5))):
        start = time.perf_counter()
        state = log_and_validate(
            source=model_dir,
            model_name="bench",
            config=config,
            validation=ValidationOptions(fresh_process=fresh),
            return_state=True,
        )
        wall = time.perf_counter() - start
        assert state.is_completed(), state.message
        rows.append((label, wall, _phase_times(state.state_details.flow_run_id)))
    plain = _plain(model_dir, fresh)

    print(
        f"\nin one process: Prefect ephemeral API start {api_start:.2f}s, "
        f"MLflow SQLite store {store_init:.2f}s"
    )
    for label, wall, phases in rows:
        _print_row(label, wall, phases)
    _print_row("plain llmadapter", sum(plain.values()), plain)
    warm_wall, warm_phases = rows[1][1], rows[1][2]
    overhead = (warm_wall - sum(warm_phases.values())) / warm_wall
    print(
        f"\nin one process, API up: Prefect overhead {100 * overhead:.1f}% of the second run; "
        f"flow vs plain calls: {warm_wall / sum(plain.values()):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
