"""The embedded default, end to end on one machine: `python -m flows.demo`.

Runs the log-and-validate flow (with promote=True) on the real offline models, SmolLM2-135M-Instruct as
llm/v1/chat and all-MiniLM-L6-v2 as llm/v1/embeddings, against Prefect's ephemeral API and a SQLite
MLflow store under the data dir (./.llmadapter), then prints the registered versions, their aliases,
the validation summaries and one real chat answer from models:/smollm2-chat@champion. The chat model
must pass a quality gate first: its answers to the shipped evaluation set (twenty capital-city and
arithmetic questions, llmadapter/evaluation/data/smollm2_basics.jsonl) are scored before it registers.

`--worse-challenger` then registers the same weights with temperature 2.0 as @challenger and runs the
promote flow with the same gate against the champion: the gate blocks it and @champion stays.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

CHAT_MODEL = "smollm2-chat"
EMBEDDINGS_MODEL = "minilm-embeddings"
QUESTION = "What is the capital of France?"


def demo_quality() -> Any:
    """The embedded default's gate: the shipped set, `contains` at least 0.5 and no regression."""
    from llmadapter.evaluation import SMOLLM2_EVAL_SET, QualityOptions, ScorerSpec

    return QualityOptions(
        dataset=str(SMOLLM2_EVAL_SET),
        scorers=[ScorerSpec(name="contains", min_score=0.5, max_regression=0.0)],
    )


def _prepare_environment(data_dir: Path) -> None:
    """Settings Prefect reads once, when it is first imported: set them before that happens."""
    os.environ.setdefault("LLMADAPTER_DATA_DIR", str(data_dir))
    os.environ.setdefault("PREFECT_HOME", str(data_dir / "prefect"))
    # Prefect's SQLite database cannot be created in a folder that does not exist yet.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # The ephemeral API starts in 10-16 s on a busy 2-core machine; Prefect's default gives up sooner.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_demo(data_dir: Path, question: str = QUESTION) -> dict[str, Any]:
    """Register both models (idempotently), promote them, and ask the chat champion one question."""
    import mlflow.pyfunc
    from prefect import flow

    from flows.log_and_validate import log_and_validate
    from llmadapter.config import ModelConfig
    from llmadapter.demo_models import minilm_folder, smollm2_gguf
    from llmadapter.registry import list_versions
    from llmadapter.settings import configure_mlflow
    from llmadapter.validation import ValidationSample
    from tasks.validate import ValidationOptions

    @flow(name="embedded-demo")
    def embedded_demo() -> list[Any]:
        chat = log_and_validate(
            source=str(smollm2_gguf(data_dir)),
            task="llm/v1/chat",
            model_name=CHAT_MODEL,
            # Greedy by default, so the quality gate scores the same answers on every run.
            config=ModelConfig(max_tokens=64, temperature=0.0),
            validation=ValidationOptions(
                samples=[
                    ValidationSample(
                        name="paris",
                        request={"messages": [{"role": "user", "content": QUESTION}], "temperature": 0},
                        expect="Paris",
                    )
                ]
            ),
            promote=True,
            quality=demo_quality(),
        )
        embeddings = log_and_validate(
            source=str(minilm_folder()), task="llm/v1/embeddings", model_name=EMBEDDINGS_MODEL, promote=True
        )
        return [chat, embeddings]

    results = embedded_demo()
    configure_mlflow()
    print("\nRegistered models (MLflow registry at", mlflow.get_registry_uri() + ")")
    for result in results:
        print(f"\n  {result.model_name}  ({result.task}, revision {result.revision[:12]})")
        for version in list_versions(result.model_name):
            aliases = " ".join("@" + a for a in version.aliases) or "-"
            tags = version.tags
            print(
                f"    version {version.version}: {aliases:<24} validation {tags.get('validation_status')}"
                f" ({tags.get('validation_checks')} checks, p50 {tags.get('validation_p50_latency_s')} s)"
            )
        what = "registered" if result.created else "reused"
        print(f"    this run: {what} v{result.version}: {result.validation}")
        if result.quality:
            print(f"    quality: {result.quality}")
    model = mlflow.pyfunc.load_model(f"models:/{CHAT_MODEL}@champion")
    answer = model.predict({"messages": [{"role": "user", "content": question}], "temperature": 0})
    text = answer["choices"][0]["message"]["content"]
    print(f"\nmodels:/{CHAT_MODEL}@champion answers {question!r}:\n  {text}\n")
    return {"results": results, "answer": text}


def run_worse_challenger(data_dir: Path) -> dict[str, Any]:
    """The same SmolLM2 weights at temperature 2.0 as @challenger, then `promote` with the demo's gate:
    blocked, the table printed, @champion unchanged."""
    from flows.log_and_validate import log_and_validate
    from flows.promote import promote
    from llmadapter.config import ModelConfig
    from llmadapter.demo_models import smollm2_gguf
    from llmadapter.registry import CHAMPION, get_alias
    from llmadapter.settings import configure_mlflow

    challenger = log_and_validate(
        source=str(smollm2_gguf(data_dir)),
        task="llm/v1/chat",
        model_name=CHAT_MODEL,
        config=ModelConfig(max_tokens=64, temperature=2.0),
    )
    configure_mlflow()
    before = get_alias(CHAT_MODEL, CHAMPION)
    state = promote(model_name=CHAT_MODEL, quality=demo_quality(), require_approval=False, return_state=True)
    after = get_alias(CHAT_MODEL, CHAMPION)
    print(f"\npromote {CHAT_MODEL} v{challenger.version} (temperature 2.0): {state.type.value}")
    if state.is_failed():
        print(state.message)
    print(
        f"@champion: version {before.version if before else '-'} before, "
        f"version {after.version if after else '-'} after"
    )
    return {"state": state, "challenger": challenger.version, "champion": after.version if after else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="Default: $LLMADAPTER_DATA_DIR or ./.llmadapter"
    )
    parser.add_argument("--question", default=QUESTION, help="What to ask the chat champion at the end.")
    parser.add_argument(
        "--worse-challenger",
        action="store_true",
        help="Then register SmolLM2 at temperature 2.0 as @challenger and try to promote it (blocked).",
    )
    args = parser.parse_args(argv)
    data_dir = (args.data_dir or Path(os.environ.get("LLMADAPTER_DATA_DIR", ".llmadapter"))).absolute()
    _prepare_environment(data_dir)
    from flows._startup import start_local_flow_process

    start_local_flow_process().wait()  # Prefect's API boots while torch, transformers and MLflow import
    run_demo(data_dir, args.question)
    if args.worse_challenger:
        run_worse_challenger(data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
