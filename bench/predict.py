"""pyfunc predict latency and batch throughput: ours vs MLflow's native llm/v1 pyfunc vs bare pipeline().

    python bench/predict.py [--model tiny|smollm2|both] [--tokens 32] [--batch 32] [--repeats 3]

Prints, in one run on the same model: latency at batch size 1 (median of --repeats) for the bare
`pipeline()` call, our pyfunc and MLflow's native pyfunc, and tokens/s for --batch requests sent as one
predict call vs the same requests one by one. All greedy, same prompt, fixed number of new tokens
(min_tokens is not an OpenAI parameter, so the prompt is one that does not end early).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long story about a fox who travels the world."


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_folder(kind: str, data_dir: Path) -> Path:
    if kind == "tiny":
        from llmadapter.testing import build_tiny_model

        return build_tiny_model(data_dir / "bench-tiny-llama", "llama", size=128, n_positions=1024)
    from llmadapter.demo_models import smollm2_folder

    return smollm2_folder(data_dir)


def bench(kind: str, tokens: int, batch: int, repeats: int, data_dir: Path) -> dict[str, float]:
    import mlflow
    import transformers

    import llmadapter

    folder = _model_folder(kind, data_dir)
    pipe = transformers.pipeline("text-generation", model=str(folder))
    messages = [{"role": "user", "content": PROMPT}]
    tmp = Path(tempfile.mkdtemp())
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("bench")
    with mlflow.start_run():
        ours_info = llmadapter.log_model(pipe, name="ours", task="llm/v1/chat")
        native_info = llmadapter.log_model(pipe, name="native", task="llm/v1/chat", native_pyfunc=True)
    ours = mlflow.pyfunc.load_model(ours_info.model_uri)
    native = mlflow.pyfunc.load_model(native_info.model_uri)
    request = {"messages": messages, "temperature": 0.0, "max_tokens": tokens}

    # Every contender must generate exactly `tokens` tokens; check before timing.
    answer = ours.predict(request)
    assert answer["usage"]["completion_tokens"] == tokens, answer["usage"]
    bare_kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}

    def bare() -> None:
        pipe(messages, **bare_kwargs)

    # MLflow's native pyfunc raises on temperature=0 (transformers wants do_sample=False), so it runs
    # with its default sampling; its token count is reported.
    native_request = {"messages": messages, "max_tokens": tokens}
    bare()  # warm-up
    native_tokens = native.predict(native_request)[0]["usage"]["completion_tokens"]
    results = {
        "bare_s": _median_time(bare, repeats),
        "ours_s": _median_time(lambda: ours.predict(request), repeats),
        "native_s": _median_time(lambda: native.predict(native_request), repeats),
        "native_tokens": native_tokens,
    }
    rows = [dict(request) for _ in range(batch)]
    start = time.perf_counter()
    out = ours.predict(rows)
    batched = time.perf_counter() - start
    generated = sum(r["usage"]["completion_tokens"] for r in out)
    start = time.perf_counter()
    sequential_tokens = 0
    for row in rows[: max(4, batch // 4)]:  # a quarter of the sequential calls is enough for a rate
        sequential_tokens += ours.predict(row)["usage"]["completion_tokens"]
    sequential = time.perf_counter() - start
    results["batch_tok_s"] = generated / batched
    results["sequential_tok_s"] = sequential_tokens / sequential
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter")
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    kinds = ["tiny", "smollm2"] if args.model == "both" else [args.model]
    for kind in kinds:
        r = bench(kind, args.tokens, args.batch, args.repeats, args.data_dir)
        print(f"\n== {kind}: {args.tokens} new tokens, greedy")
        print(f"batch 1 latency   bare pipeline()   {r['bare_s'] * 1000:8.1f} ms")
        print(
            f"                  ours (pyfunc)     {r['ours_s'] * 1000:8.1f} ms   "
            f"overhead {100 * (r['ours_s'] / r['bare_s'] - 1):+.1f}% vs bare (target <= +10%)"
        )
        print(
            f"                  mlflow native     {r['native_s'] * 1000:8.1f} ms   "
            f"ours is {r['native_s'] / r['ours_s']:.2f}x faster "
            f"(native sampled {r['native_tokens']} tokens)"
        )
        print(
            f"batch {args.batch} in one predict {r['batch_tok_s']:8.1f} tok/s vs sequential "
            f"{r['sequential_tok_s']:.1f} tok/s: "
            f"{r['batch_tok_s'] / r['sequential_tok_s']:.1f}x (target >= 5x)"
        )


if __name__ == "__main__":
    main()
