"""Evaluation throughput: the shipped 20-row set on SmolLM2, all rows in one predict call vs one by one.

    python bench/evaluation.py [--model smollm2|tiny] [--repeats 2] [--threads N] [--whole] [--data-dir DIR]

Prints, in one run on the same loaded model (in this process, so loading is not counted): rows/s of the
evaluation's predictions as one predict call (what `evaluate_model` does: the engine answers the rows as
one batch) vs one predict call per row, their ratio (target >= 4x), and with --whole the whole
`evaluate_model` (fresh process, predictions, mlflow.genai.evaluate scoring into a SQLite store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _folder(kind: str, data_dir: Path) -> Path:
    if kind == "tiny":
        from llmadapter.testing import build_tiny_model

        return build_tiny_model(data_dir / "bench-tiny-llama", "llama", size=128, n_positions=1024)
    from llmadapter.demo_models import smollm2_folder

    return smollm2_folder(data_dir)


def bench(kind: str, repeats: int, data_dir: Path, whole: bool) -> dict[str, float]:
    import mlflow

    import llmadapter
    from llmadapter.evaluation import (
        SMOLLM2_EVAL_SET,
        QualityOptions,
        ScorerSpec,
        evaluate_model,
        prepare_evaluation,
    )
    from llmadapter.validation.worker import InProcessSession

    tmp = Path(tempfile.mkdtemp())
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("bench-evaluation")
    with mlflow.start_run():
        info = llmadapter.log_model(
            str(_folder(kind, data_dir)), name="model", task="llm/v1/chat", model_config={"temperature": 0.0}
        )
    options = QualityOptions(dataset=str(SMOLLM2_EVAL_SET), scorers=[ScorerSpec(name="contains")])
    plan = prepare_evaluation(options, [info.model_uri])
    requests = [row.request for row in plan.dataset.rows]
    session = InProcessSession(info.model_uri)
    session.predict_batch(requests[:2])  # warm-up
    batched, single = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine
        start = time.perf_counter()
        outcomes = session.predict_batch(requests)
        batched.append(time.perf_counter() - start)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
        start = time.perf_counter()
        for request in requests:
            assert session.predict(request).ok
        single.append(time.perf_counter() - start)
    session.close()
    n = len(requests)
    out = {
        "rows": n,
        "batched_rows_s": n / statistics.median(batched),
        "single_rows_s": n / statistics.median(single),
    }
    if whole:
        start = time.perf_counter()
        evaluation = evaluate_model(plan, info.model_uri)
        out |= {
            "evaluate_s": time.perf_counter() - start,
            "evaluate_load_s": evaluation.load_s,
            "evaluate_predict_s": evaluation.predict_s,
            "contains": evaluation.means["contains"],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--whole", action="store_true", help="Also time evaluate_model end to end.")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    r = bench(args.model, args.repeats, args.data_dir, args.whole)
    ratio = r["batched_rows_s"] / r["single_rows_s"]
    print(f"\nevaluation of {r['rows']:.0f} rows on {args.model} (greedy, max_tokens 32 per row)")
    print(f"  one predict call : {r['batched_rows_s']:.2f} rows/s")
    print(f"  one call per row : {r['single_rows_s']:.2f} rows/s")
    print(f"  batched / one by one: {ratio:.1f}x (target >= 4x)")
    if "evaluate_s" not in r:
        return 0
    scoring = r["evaluate_s"] - r["evaluate_load_s"] - r["evaluate_predict_s"]
    print(
        f"  evaluate_model (fresh process): {r['evaluate_s']:.1f} s = load {r['evaluate_load_s']:.1f} s + "
        f"predict {r['evaluate_predict_s']:.1f} s + process start, scoring and MLflow run {scoring:.1f} s; "
        f"contains {r['contains']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
