"""Weight formats: decode speed and quality of float32, bfloat16, int8 and int4 (torchao) on CPU.

    python bench/formats.py [--model smollm2|trained|both] [--speed-only] [--no-validation] [--threads N]
                            [--data-dir DIR]

1. Speed (SmolLM2-135M-Instruct): decode ms/step at batch 1, 8 and 32 after a 32-token prefill, for
   float32, bfloat16, float16 (to show why it is refused on CPU), int8 (torchao Int8WeightOnlyConfig) and
   int4 (torchao's CPU int4 kernel, Int4OpaqueTensor) at group sizes 32 and 64.
2. Quality, per format vs float32, on SmolLM2 and the tiny trained test model: greedy answers identical
   to float32's on N prompts (through our engine), mean KL divergence and top-1 agreement of next-token
   distributions over a fixed text, the load-time check's agreement, and the validation report of the
   model logged with that format in its model_config (validated in this process, loaded as it serves).
"""

from __future__ import annotations

import argparse
import copy
import json
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

FIXED_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Books became cheaper, literacy spread, and "
    "ideas travelled faster than ever before. Scientists shared their results in journals, merchants kept "
    "better accounts, and governments printed laws for everyone to read. Today we write on computers and "
    "phones, yet the basic idea is the same: copy a text many times, exactly, so that many people can read "
    "it. What is the capital of France? The capital of France is Paris, a city on the river Seine."
)
FORMATS = {  # name -> (dtype, quantization)
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}


def _prompts(model: str) -> list[list[dict[str, str]]]:
    if model == "trained":
        from llmadapter.testing import TRAINED_PROMPT

        texts = [TRAINED_PROMPT, "What is the capital of France?", "Name a colour.", "Count to ten."]
        return [[{"role": "user", "content": t}] for t in texts]
    rows = (ROOT / "llmadapter/evaluation/data/smollm2_basics.jsonl").read_text().splitlines()
    return [json.loads(r)["request"]["messages"] for r in rows]


def _load(folder: Path) -> tuple[Any, Any]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32").eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(folder))


def _prepared(base: Any, tokenizer: Any, dtype: str, quantization: str, group_size: int | None = None) -> Any:
    from llmadapter.config import WeightFormat
    from llmadapter.engine import weights

    model = copy.deepcopy(base)
    sizes = weights.INT4_GROUP_SIZES
    if group_size is not None:
        weights.INT4_GROUP_SIZES = (group_size,)
    try:
        served = weights.apply_generation_format(
            model, tokenizer, WeightFormat(dtype, quantization, "cpu"), task="llm/v1/chat"
        )
    finally:
        weights.INT4_GROUP_SIZES = sizes
    model.served = served
    return model


def _int4_everywhere(base: Any) -> Any:
    """int4 on every linear layer, lm_head included (what the served int4 avoids for the output layer)."""
    import torch
    from torchao.quantization import quantize_

    from llmadapter.engine.weights import _torchao_config

    model = copy.deepcopy(base).to(torch.bfloat16)
    quantize_(model, _torchao_config("int4", "cpu", 32))
    return model


class _Decoder:
    """One model decoding `batch` rows after a prompt_len prefill; step() times one decode step."""

    def __init__(self, model: Any, batch: int, prompt_len: int = 32) -> None:
        import torch
        from transformers import DynamicCache

        self.model = model
        with torch.inference_mode():
            ids = torch.randint(100, 1000, (batch, prompt_len))
            out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        self.cache, self.tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(input_ids=self.tok, past_key_values=self.cache, use_cache=True)
        self.cache, self.tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


def decode_ms(models: list[Any], batch: int, rounds: int, steps: int = 2) -> list[float]:
    """Median ms/step of each model at `batch`, the models interleaved round by round (so a machine whose
    load changes during the run weighs on every format alike)."""
    decoders = [_Decoder(m, batch) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, decoder in enumerate(decoders):
            times[i].extend(decoder.step() for _ in range(steps))
    return [statistics.median(t) * 1000 for t in times]


def speed(folder: Path, steps: int) -> None:
    import torch

    base, tokenizer = _load(folder)
    rows: list[tuple[str, Any]] = [
        ("float32", base),
        ("bfloat16", _prepared(base, tokenizer, "bfloat16", "none")),
    ]
    fp16 = copy.deepcopy(base).to(torch.float16)  # what dtype float16 would run on CPU (refused at load)
    rows.append(("float16 (refused on CPU)", fp16))
    rows.append(("int8 (Int8WeightOnlyConfig)", _prepared(base, tokenizer, "bfloat16", "int8")))
    rows.append(("int4 (served: group 32, lm_head int8)", _prepared(base, tokenizer, "bfloat16", "int4")))
    rows.append(("int4 group 64, lm_head int8", _prepared(base, tokenizer, "bfloat16", "int4", 64)))
    rows.append(("int4 group 32, lm_head int4 too", _int4_everywhere(base)))
    threads = torch.get_num_threads()
    print(
        f"\n## Decode ms/step on SmolLM2-135M ({threads} threads, median over {steps} interleaved rounds)\n"
    )
    print("| format | batch 1 | batch 8 | batch 32 |")
    print("|---|---|---|---|")
    columns = [
        decode_ms([m for _, m in rows], b, steps if b < 32 else max(3, steps // 2)) for b in (1, 8, 32)
    ]
    for i, (name, _) in enumerate(rows):
        print(f"| {name} | " + " | ".join(f"{col[i]:.1f}" for col in columns) + " |", flush=True)


def _next_token_logprobs(model: Any, tokenizer: Any) -> Any:
    import torch

    ids = tokenizer(FIXED_TEXT, return_tensors="pt")["input_ids"][:, :200]  # the tiny model holds 256
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)


def _answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]]) -> list[str]:
    from llmadapter.catalog import get_task
    from llmadapter.config import ModelConfig
    from llmadapter.engine.generation import GenerationEngine

    engine = GenerationEngine(
        model, tokenizer, spec=get_task("llm/v1/chat"), config=ModelConfig(), model_name="m"
    )
    try:
        reqs = [engine.parse({"messages": m, "temperature": 0, "max_tokens": 32}) for m in prompts]
        return [a.choices[0].message.content or "" for a in engine.run(reqs)]
    finally:
        engine.close()


def _validation(folder: Path, dtype: str, quantization: str, store: Path) -> str:
    import mlflow

    import llmadapter
    from llmadapter.validation import validate_model

    with mlflow.start_run():
        info = llmadapter.log_model(
            str(folder),
            name="model",
            task="llm/v1/chat",
            model_config={"dtype": dtype, "quantization": quantization, "temperature": 0},
        )
    report = validate_model(info.model_uri, fresh_process=False)
    failed = [c.name for c in report.failed_checks]
    passed = len(report.checks) - len(failed)
    return f"{report.status} {passed}/{len(report.checks)}" + (
        f" (failed: {', '.join(failed)})" if failed else ""
    )


def quality(label: str, folder: Path, validate: bool, only: list[str] | None = None) -> None:
    base, tokenizer = _load(folder)
    prompts = _prompts(label)
    reference = _answers(base, tokenizer, prompts)
    ref_lp = _next_token_logprobs(base, tokenizer)
    print(f"\n## Quality vs float32 on {label} ({len(prompts)} greedy prompts, 32 tokens; fixed text "
          f"{ref_lp.shape[0]} tokens)\n")  # fmt: skip
    print("| format | greedy answers = float32 | mean KL | top-1 agreement | load check | validation |")
    print("|---|---|---|---|---|---|")
    store = Path(tempfile.mkdtemp(prefix="formats-bench-"))
    if validate:
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        mlflow.set_experiment("formats")
    for name, (dtype, quant) in FORMATS.items():
        if only and name not in only:
            continue
        model = base if name == "float32" else _prepared(base, tokenizer, dtype, quant)
        answers = _answers(model, tokenizer, prompts)
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        lp = _next_token_logprobs(model, tokenizer)
        kl = float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
        agree = float((lp.argmax(-1) == ref_lp.argmax(-1)).float().mean())
        served = getattr(model, "served", None)
        check = "exact" if served is None or served.agreement is None else f"{served.agreement:.0%}"
        report = _validation(folder, dtype, quant, store) if validate else "-"
        print(f"| {name} | {same}/{len(prompts)} | {kl:.4f} | {agree:.1%} | {check} | {report} |", flush=True)
        if label == "trained" or name == "int4":
            print(f"<!-- {name}: {answers[0]!r} -->")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("smollm2", "trained", "both"), default="both")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-validation", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--formats", nargs="*", choices=list(FORMATS), help="quality of these only")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".pytest_cache/d/llmadapter-models")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from llmadapter.demo_models import smollm2_folder
    from llmadapter.testing import build_tiny_model

    smollm2 = smollm2_folder(args.data_dir / "smollm2") if args.model != "trained" else None
    if smollm2 is not None and not args.no_speed:
        speed(smollm2, args.steps)
    if args.speed_only:
        return
    if args.model in ("trained", "both"):
        quality(
            "trained",
            build_tiny_model(args.data_dir / "trained-gpt2", "gpt2", trained=True),
            not args.no_validation,
        )
    if smollm2 is not None:
        quality("smollm2", smollm2, not args.no_validation, args.formats)


if __name__ == "__main__":
    main()
