"""Log, register and load on the platform path vs the embedded default, measured in the same run.

    python bench/platform_path.py [--model tiny|smollm2|both] [--rounds 3] [--data-dir DIR]

Three stores, used in turn within each round (so that load on the machine hits them alike):
- embedded: the default, a SQLite tracking store with local artifacts, no server;
- proxied: `mlflow server` on PostgreSQL, artifacts through the server into SeaweedFS's S3 bucket (the
  client holds no S3 credentials);
- direct: `mlflow server` on PostgreSQL, the client writes and reads the bucket itself.
Per store and phase (log the model in a new run; validate it in a fresh process, which downloads it;
register it and set @champion; load models:/NAME@champion into an engine, as `llmadapter serve` does),
the median over the rounds and the ratio to the embedded default. These are log-and-validate's own
calls without Prefect (whose overhead does not depend on the stores). Target: the whole pipeline on
PostgreSQL/S3 within 1.3x of SQLite/local.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("log", "validate", "register", "load")


def _model_folder(kind: str, data_dir: Path) -> Path:
    if kind == "tiny":
        from llmadapter.testing import build_tiny_model

        return build_tiny_model(data_dir / "bench-tiny-llama", "llama", size=128, n_positions=1024)
    from llmadapter.demo_models import smollm2_folder

    return smollm2_folder(data_dir)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _one_pipeline(uri: str, folder: Path, name: str, artifact_root: str | None) -> dict[str, float]:
    """log -> validate -> register + @champion -> load, against tracking store `uri`; seconds per phase."""
    import mlflow
    from mlflow import MlflowClient

    import llmadapter
    from llmadapter.validation import validate_model

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name("bench")
    if experiment is None:
        client.create_experiment("bench", artifact_location=artifact_root)
    mlflow.set_experiment("bench")
    times: dict[str, float] = {}
    start = time.perf_counter()
    with mlflow.start_run():
        info = llmadapter.log_model(str(folder), name="model", task="llm/v1/chat")
    times["log"] = time.perf_counter() - start
    start = time.perf_counter()
    report = validate_model(info.model_uri)  # a fresh process, which downloads the model
    if not report.passed:
        raise SystemExit(f"validation failed: {report.summary()}")
    times["validate"] = time.perf_counter() - start
    start = time.perf_counter()
    version = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, "champion", version.version)
    times["register"] = time.perf_counter() - start
    start = time.perf_counter()
    engine = llmadapter.load_engine(f"models:/{name}@champion")
    times["load"] = time.perf_counter() - start
    engine.close()
    return times


def bench(kind: str, rounds: int, data_dir: Path) -> dict[str, dict[str, float]]:
    from llmadapter.stack import LocalStack

    folder = _model_folder(kind, data_dir)
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    print(f"\n== {kind}: {folder} ({size_mb:.0f} MB)", flush=True)
    with tempfile.TemporaryDirectory(prefix="llmadapter-bench-platform-") as tmp:
        root = Path(tmp)
        stack = LocalStack(root / "stack", prefect=False, worker=False, project_dir=ROOT)
        began = time.perf_counter()
        try:
            stack.up()
            assert stack.database is not None and stack.objectstore is not None
            stack.database.create_database("mlflow_direct")
            _, direct_uri = stack.add_mlflow_server(
                "mlflow-direct", stack.database.url("mlflow_direct"), "direct"
            )
            print(
                f"stack (PostgreSQL, SeaweedFS, 2 mlflow servers) up in {time.perf_counter() - began:.1f} s"
            )
            embedded = f"sqlite:///{root / 'mlflow.db'}"
            (root / "artifacts").mkdir()
            targets: dict[str, tuple[str, dict[str, str], str | None]] = {
                "embedded": (embedded, {}, (root / "artifacts").as_uri()),
                "proxied": (stack.mlflow_uri, {}, None),
                "direct": (direct_uri, stack.objectstore.client_env(), None),
            }
            samples: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
            for round_ in range(rounds + 1):  # round 0 warms up imports, caches and each store's tables
                for target, (uri, env, artifact_root) in targets.items():
                    with _environment(env):
                        times = _one_pipeline(uri, folder, f"bench-{kind}-{round_}", artifact_root)
                    if round_ > 0:
                        samples[target].append(times)
                    print(
                        f"  round {round_} {target:9} " + "  ".join(f"{p} {times[p]:6.2f} s" for p in PHASES)
                    )
        finally:
            stack.down()
            if stack.database is not None:
                stack.database.remove()  # it may live outside the temp dir (see llmadapter.stack.database)
    return {t: {p: statistics.median(s[p] for s in runs) for p in PHASES} for t, runs in samples.items()}


def _report(results: dict[str, dict[str, float]]) -> None:
    base = results["embedded"]
    base_total = sum(base.values())
    print(f"{'':10} " + "".join(f"{p:>18}" for p in PHASES) + f"{'pipeline':>18}")
    for target, phases in results.items():
        total = sum(phases.values())
        cells: list[str] = []
        for phase in PHASES:
            ratio = "" if target == "embedded" else f" {phases[phase] / base[phase]:.2f}x"
            cells.append(f"{phases[phase]:7.2f} s{ratio:>8}")
        ratio = "" if target == "embedded" else f" {total / base_total:.2f}x"
        print(f"{target:10} " + "".join(f"{c:>18}" for c in cells) + f"{f'{total:7.2f} s{ratio:>8}':>18}")
    for target in ("proxied", "direct"):
        ratio = sum(results[target].values()) / base_total
        verdict = "meets" if ratio <= 1.3 else "misses"
        print(f"PostgreSQL/S3 ({target}) vs SQLite/local: {ratio:.2f}x ({verdict} the 1.3x target)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter" / "bench")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    kinds = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    for kind in kinds:
        _report(bench(kind, args.rounds, args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
