"""Where one decode step of our engine spends its time, at batch 1 and batch 32, on SmolLM2.

    python bench/profile_step.py [--batch 1,32] [--steps 8] [--format float32] [--torch-threads 2]

The engine is llmadapter's own (build_engine on a saved artifact: GenerationEngine and its Scheduler
thread), fed greedy chat requests of mixed prompt lengths (`ignore_eos`, so every row runs every step).
All but one request start together; the last joins the running batch after two steps, so the batch
also pays one cache merge, as a server's does. Steps at the full batch size are measured three ways:

1. wall clock: the scheduler's methods wrapped with timers (no profiler running), per step:
   model forward, the step's own tensors (ids, mask), sampling, per-sequence Python (detokenizing,
   stop matching, the rest of the bookkeeping and the sinks), dropping finished rows, the loop;
2. torch.profiler around a few steps (on the scheduler thread): the forward's operators by kind
   (matmuls, attention, KV-cache append, attention-mask building, other ops) and the Python between
   them; shares of the forward, applied to its wall-clock time from 1;
3. cProfile around the same kind of steps: the Python functions with the most own time.

Also printed: how much of the attention's key length is padding (columns masked out for a row),
the cost of merging the newcomer's KV cache into the batch, and tokens/s of the steady loop.
About 1-2 minutes on 2 cores (the first run saves the artifact once under --data-dir).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own start/stop lines

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import OursFormat, format_config  # noqa: E402  (bench/ is not a package)

# Mixed lengths, so rows are left-padded to the longest prompt as in a served batch.
USERS = [
    "Hi.",
    "Write a long story about a fox who travels the world.",
    "Explain, in simple words and with an example, how a train timetable is organised.",
    "List three colours.",
    "What should a traveller pack for a week of hiking in the mountains in late autumn, and why?",
    "Tell me a joke.",
    "Describe the city of Paris to someone who has never left their village, in a friendly tone.",
    "Count to ten.",
]
STEP = "step"  # the wall-clock record of one decode step


class StepTimers:
    """Wall-clock time of the scheduler's parts, per decode step (and per admission)."""

    def __init__(self) -> None:
        self.phase = "loop"  # "decode" inside _decode_step, "prefill" inside _prefill, else "loop"
        self.steps: list[dict[str, float]] = []
        self.admissions: list[dict[str, float]] = []
        self.step: dict[str, float] | None = None  # the decode step being timed (or the last one)
        self.admission: dict[str, float] | None = None
        self.cprofile: cProfile.Profile | None = None
        self.torch_prof: list[Any] = []
        self.torch_mode = False

    def add(self, label: str, seconds: float) -> None:
        # The records themselves, not the lists' last items: the main thread starts new lists while the
        # scheduler thread still finishes the step that answered the last request.
        record = {"decode": self.step, "prefill": self.admission}.get(self.phase)
        if self.phase == "loop" and label == "drop finished rows":
            record = self.step
        if record is not None:
            record[label] = record.get(label, 0.0) + seconds

    def timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        from torch.profiler import record_function

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                if self.torch_mode:
                    with record_function(f"llmadapter/{label}"):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)

        return wrapper


def instrument(scheduler: Any, timers: StepTimers) -> None:
    """Wrap the scheduler's parts (on this instance, its module and its helper classes) with timers."""
    import transformers.models.llama.modeling_llama as llama

    import llmadapter.engine.scheduler as sched_module
    from llmadapter.engine.stops import IncrementalDecoder, StopMatcher

    model = scheduler.model

    class TimedModel:
        """The model as the scheduler calls it; everything else is the model's own."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(model, name)

    forward = timers.timed(model, "model forward")
    head = model.get_output_embeddings()
    head.forward = timers.timed(head.forward, "lm_head")
    scheduler.model = TimedModel()
    if not hasattr(llama, "_bench_original_mask"):
        llama._bench_original_mask = llama.create_causal_mask  # type: ignore[attr-defined]
        sched_module._bench_original_choose = sched_module.choose_tokens  # type: ignore[attr-defined]
        IncrementalDecoder._bench_push = IncrementalDecoder.push  # type: ignore[attr-defined]
        StopMatcher._bench_feed = StopMatcher.feed  # type: ignore[attr-defined]
    llama.create_causal_mask = timers.timed(llama._bench_original_mask, "attention mask")  # type: ignore[attr-defined]
    sched_module.choose_tokens = timers.timed(sched_module._bench_original_choose, "sampling")  # type: ignore[attr-defined]
    IncrementalDecoder.push = timers.timed(IncrementalDecoder._bench_push, "detokenizing")  # type: ignore[attr-defined,method-assign]
    StopMatcher.feed = timers.timed(StopMatcher._bench_feed, "stop matching")  # type: ignore[attr-defined,method-assign]
    scheduler._record = timers.timed(scheduler._record, "per-sequence bookkeeping")
    scheduler._merge = timers.timed(scheduler._merge, "cache merge")
    scheduler._drop_finished = timers.timed(scheduler._drop_finished, "drop finished rows")

    decode, prefill = scheduler._decode_step, scheduler._prefill

    def decode_step() -> None:
        batch = scheduler._batch
        mask = batch.mask
        padded = float(1 - mask.float().mean()) if mask is not None else 0.0
        record = {
            "batch": len(batch),
            "padding": padded,
            "columns": mask.shape[1] + 1 if mask is not None else 0,
        }
        timers.step = record
        timers.steps.append(record)
        timers.phase = "decode"
        start = time.perf_counter()
        try:
            if timers.cprofile is not None:
                timers.cprofile.enable()  # this thread only: the scheduler's
            if timers.torch_mode:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    decode()
                timers.torch_prof.append(prof)
            else:
                decode()
        finally:
            if timers.cprofile is not None:
                timers.cprofile.disable()
            record[STEP] = time.perf_counter() - start
            record["start"] = start
            timers.phase = "loop"

    def prefill_seqs(seqs: list[Any]) -> None:
        record = {"joining": len(seqs), "running": len(scheduler._batch)}
        timers.admission = record
        timers.admissions.append(record)
        timers.phase = "prefill"
        start = time.perf_counter()
        try:
            prefill(seqs)
        finally:
            record["prefill"] = time.perf_counter() - start
            timers.phase = "loop"

    scheduler._decode_step = decode_step
    scheduler._prefill = prefill_seqs


def artifact(data_dir: Path, fmt: OursFormat) -> Path:
    """SmolLM2 saved as an llmadapter artifact once (the engine loads it as the server does)."""
    import llmadapter
    from llmadapter.demo_models import smollm2_folder

    path = data_dir / "bench-profile-SmolLM2"
    if not (path / "MLmodel").is_file():
        folder = smollm2_folder(data_dir)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        llmadapter.save_model(str(folder), tmp, task="llm/v1/chat")
        tmp.rename(path)
    return path


def requests(n: int, tokens: int) -> list[Any]:
    from llmadapter.protocol import ChatCompletionRequest

    return [
        ChatCompletionRequest.model_validate(
            {
                "messages": [{"role": "user", "content": USERS[i % len(USERS)]}],
                "temperature": 0,
                "max_tokens": tokens,
                "ignore_eos": True,
            }
        )
        for i in range(n)
    ]


def run_batch(engine: Any, timers: StepTimers, batch: int, tokens: int) -> None:
    """`batch` requests: all but one start together, the last joins after two decode steps."""
    reqs = requests(batch, tokens)
    first = threading.Thread(target=engine.run, args=(reqs[:-1],)) if batch > 1 else None
    if first is None:
        engine.run(reqs)
        return
    before = len(timers.steps)
    first.start()
    while len(timers.steps) < before + 2 and first.is_alive():
        time.sleep(0.001)
    engine.run(reqs[-1:])
    first.join()


@contextmanager
def measuring(timers: StepTimers) -> Iterator[list[dict[str, float]]]:
    timers.steps, timers.admissions = [], []
    yield timers.steps


def full_steps(steps: list[dict[str, float]], batch: int, skip: int) -> list[dict[str, float]]:
    full = [s for s in steps if s["batch"] == batch]
    return full[skip:] if len(full) > skip + 1 else full


ATTENTION = "attention (sdpa, softmax)"
OP_KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("matmuls (q/k/v/o projections, MLP)", ("mm", "matmul", "linear", "addmm", "bmm", "mkldnn")),
    (ATTENTION, ("scaled_dot_product", "attention", "softmax")),
    ("KV cache append (cat)", ("aten::cat",)),
]


# Operators under these labels are counted as the label says, whatever they are.
INNER_KINDS = {
    "llmadapter/attention mask": "attention mask build (padding)",
    "llmadapter/lm_head": "lm_head (logits over the vocabulary)",
}


def op_kind(name: str) -> str:
    for kind, needles in OP_KINDS:
        if any(needle in name for needle in needles):
            return kind
    return "other ops (norms, rotary, activations, copies)"


def forward_shares(profs: list[Any]) -> dict[str, float]:
    """Self CPU time under the model forward, by kind, as shares of the forward's total."""
    totals: dict[str, float] = defaultdict(float)
    forward_total = 0.0
    for prof in profs:
        for event in prof.events():
            labels = []
            parent = event
            while parent is not None:
                if parent.name.startswith("llmadapter/"):
                    labels.append(parent.name)
                parent = parent.cpu_parent
            if "llmadapter/model forward" not in labels:
                continue
            if event.name == "llmadapter/model forward":
                forward_total += event.cpu_time_total
                continue
            if event.name.startswith("llmadapter/"):
                continue
            kind = INNER_KINDS.get(labels[0]) or op_kind(event.name)
            totals[kind] += event.self_cpu_time_total
    if forward_total <= 0:
        return {}
    shares = {kind: t / forward_total for kind, t in totals.items()}
    shares["Python between ops (modules, dispatch)"] = max(0.0, 1 - sum(shares.values()))
    return shares


def report(
    batch: int, steps: list[dict[str, float]], admissions: list[dict[str, float]], shares: dict[str, float]
) -> None:
    # Means, not medians: the parts of a step then add up to the step.
    step = statistics.mean(s[STEP] for s in steps)
    cycles = [b["start"] - a["start"] for a, b in itertools.pairwise(steps)]
    cycle = statistics.mean(cycles) if cycles else step

    def part(label: str) -> float:
        return statistics.mean(s.get(label, 0.0) for s in steps)

    forward = part("model forward")
    mask = part("attention mask")
    sampling, record = part("sampling"), part("per-sequence bookkeeping")
    detok, stops = part("detokenizing"), part("stop matching")
    drop = part("drop finished rows")
    tensors = step - forward - sampling - record
    padding = statistics.median(s["padding"] for s in steps)
    columns = statistics.median(s["columns"] for s in steps)
    print(
        f"\n== batch {batch}: one decode step {step * 1000:.1f} ms (mean of {len(steps)}), loop cycle "
        f"{cycle * 1000:.1f} ms = {batch / cycle:.1f} tok/s; key length {columns:.0f}, "
        f"{padding:.0%} of it padding"
    )

    def line(label: str, seconds: float, depth: int = 1) -> None:
        share = seconds / cycle if cycle else 0.0
        print(f"{'  ' * depth}{label:<48}{seconds * 1000:>9.2f} ms {share:>6.1%}")

    line("model forward", forward)
    for kind, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        line(kind, forward * share, 2)
        if kind == ATTENTION:
            # At decode the query is one token: attention's cost grows with the key length, padding included.
            line("of which over padded key columns (estimate)", forward * share * padding, 3)
    line("attention mask build, wall clock", mask, 2)
    line("step tensors (ids, mask append, logits to float)", max(0.0, tensors))
    line("sampling (choose_tokens)", sampling)
    line(f"per-sequence Python ({batch} rows, {record / batch * 1e6:.0f} us each)", record)
    line("detokenizing (IncrementalDecoder.push)", detok, 2)
    line("stop matching (StopMatcher.feed)", stops, 2)
    line("the rest: finish checks, sinks, timings", max(0.0, record - detok - stops), 2)
    line("drop finished rows (cache slicing)", drop)
    line("loop (lock, admit, inference_mode)", max(0.0, cycle - step - drop))
    for a in admissions:
        if a["running"]:
            print(
                f"  admission of {a['joining']:.0f} into {a['running']:.0f} running: prefill + merge "
                f"{a['prefill'] * 1000:.1f} ms, of which cache merge {a.get('cache merge', 0) * 1000:.2f} ms"
            )


def top_python(prof: cProfile.Profile, n: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(n)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print("\n".join(lines[start : start + n + 1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=8, help="decode steps measured per batch size")
    parser.add_argument(
        "--format", default="default", type=OursFormat.parse, help="our weight format (as bench/serving.py)"
    )
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--top", type=int, default=15, help="Python functions listed from cProfile")
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".llmadapter")
    args = parser.parse_args()

    import torch

    import llmadapter

    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    config, note = format_config(args.format)
    engine: Any = llmadapter.build_engine(artifact(args.data_dir, args.format), model_config=config or None)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"SmolLM2-135M-Instruct, format {args.format.name}{f' ({note})' if note else ''}, "
        f"{args.torch_threads} torch threads, torch {torch.__version__}, load average {load}"
    )
    timers = StepTimers()
    instrument(engine.scheduler, timers)
    try:
        for batch in [int(b) for b in args.batch.split(",")]:
            tokens = args.steps + 6
            run_batch(engine, timers, batch, 2)  # warm-up
            with measuring(timers) as steps:
                run_batch(engine, timers, batch, tokens)
            admissions = timers.admissions
            measured = full_steps(steps, batch, skip=1)
            timers.torch_mode = True
            with measuring(timers) as steps:
                run_batch(engine, timers, batch, 5)
            timers.torch_mode = False
            profs = [p for p, s in zip(timers.torch_prof, steps, strict=False) if s["batch"] == batch]
            timers.torch_prof = []
            report(batch, measured, admissions, forward_shares(profs))
            timers.cprofile = cProfile.Profile()
            with measuring(timers):
                run_batch(engine, timers, batch, 5)
            print(f"  cProfile, Python functions by own time over the {batch}-row run's decode steps:")
            top_python(timers.cprofile, args.top)
            timers.cprofile = None
    finally:
        engine.close()
    print(f"\n(profiled in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
