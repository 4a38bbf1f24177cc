"""Weight formats (llmadapter.engine.weights): resolution and precedence, device placement, torchao int8 /
int4 on the real tiny models through the engine and build_engine, and the load-time refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import llmadapter
from llmadapter.catalog import CHAT, get_task
from llmadapter.config import ModelConfig, WeightFormat, validate_config
from llmadapter.engine.generation import GenerationEngine
from llmadapter.engine.scheduler import Scheduler
from llmadapter.engine.weights import (
    apply_generation_format,
    apply_weight_format,
    pick_group_size,
    resolve_device,
    resolve_format,
)
from llmadapter.errors import ConfigError
from llmadapter.mlflow_model import build_engine
from llmadapter.server.settings import ServerSettings
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT

HELLO = [{"role": "user", "content": TRAINED_PROMPT}]


def _load(folder: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32").eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(folder))


def _greedy(model: Any, tokenizer: Any) -> str:
    engine = GenerationEngine(model, tokenizer, spec=get_task(CHAT), config=ModelConfig(), model_name="m")
    try:
        answer = engine.run([engine.parse({"messages": HELLO, "temperature": 0, "max_tokens": 100})])[0]
        return answer.choices[0].message.content or ""  # type: ignore[attr-defined]
    finally:
        engine.close()


@pytest.fixture()
def cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolution logic as it runs on a one-GPU machine (the CUDA calls it makes, answered)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- resolution (pure logic) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "source", "expected"),
    [
        (WeightFormat(), None, ("float32", "none", "cpu")),
        (WeightFormat(), "int4", ("bfloat16", "int4", "cpu")),
        (WeightFormat(quantization="none"), "int4", ("float32", "none", "cpu")),
        (WeightFormat(dtype="bfloat16"), None, ("bfloat16", "none", "cpu")),
        (WeightFormat(quantization="int8"), None, ("bfloat16", "int8", "cpu")),
        (WeightFormat(dtype="float32", quantization="int4"), None, ("bfloat16", "int4", "cpu")),
    ],
    ids=[
        "auto-cpu-exact",
        "gguf-q4-default",
        "gguf-forced-float",
        "bf16",
        "int8-bf16-acts",
        "int4-over-fp32",
    ],
)
def test_resolve_format_on_cpu(
    no_cuda: None, asked: WeightFormat, source: str | None, expected: tuple[str, str, str]
) -> None:
    fmt = resolve_format(asked, source_quantization=source)
    assert (fmt.dtype, fmt.quantization, fmt.device) == expected


def test_auto_on_cuda_is_bfloat16_on_the_first_gpu(cuda: None) -> None:
    fmt = resolve_format(WeightFormat())
    assert (fmt.dtype, fmt.quantization, fmt.device) == ("bfloat16", "none", "cuda:0")
    assert resolve_format(WeightFormat(dtype="float16", device="cuda")).dtype == "float16"
    assert resolve_device("cpu") == "cpu"


def test_a_missing_gpu_index_names_device(cuda: None) -> None:
    with pytest.raises(ConfigError, match=r"cuda:1.*1 CUDA device") as info:
        resolve_device("cuda:1")
    assert info.value.param == "device"


@pytest.mark.parametrize("asked", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_an_error_naming_device(no_cuda: None, asked: str) -> None:
    with pytest.raises(ConfigError, match="no CUDA device") as info:
        resolve_device(asked)
    assert info.value.param == "device"


def test_this_machine_resolves_auto_to_what_it_has() -> None:
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_float16_on_cpu_is_refused_naming_dtype(no_cuda: None) -> None:
    with pytest.raises(ConfigError, match=r"float16.*bfloat16") as info:
        resolve_format(WeightFormat(dtype="float16"))
    assert info.value.param == "dtype"


def test_server_settings_win_over_model_config_field_by_field() -> None:
    server = WeightFormat(dtype="auto", quantization="int4", device="cpu")
    config = WeightFormat(dtype="float32", quantization="int8")
    assert server.over(config) == WeightFormat(dtype="float32", quantization="int4", device="cpu")
    assert WeightFormat().over(config) == config


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [([576, 1536], 32), ([512, 2048], 32), ([64, 96], 32), ([40, 64, 128], 32), ([40, 80], None)],
    ids=["smollm2", "all-128", "tiny", "some-layers", "none"],
)
def test_int4_group_size_is_32_where_it_fits(sizes: list[int], expected: int | None) -> None:
    assert pick_group_size(sizes) == expected


def test_server_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMADAPTER_DTYPE", "bfloat16")
    monkeypatch.setenv("LLMADAPTER_QUANTIZATION", "int4")
    monkeypatch.setenv("LLMADAPTER_DEVICE", "cuda:1")
    assert ServerSettings().weight_format() == WeightFormat("bfloat16", "int4", "cuda:1")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LLMADAPTER_DTYPE", "float8"), ("LLMADAPTER_QUANTIZATION", "int3"), ("LLMADAPTER_DEVICE", "tpu")],
    ids=["dtype", "quantization", "device"],
)
def test_a_bad_server_setting_stops_serve_naming_it(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmadapter.cli import main

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        main(["serve", "some-model"])
    assert info.value.code == 2
    assert f"--{variable.removeprefix('LLMADAPTER_').lower()}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "key"),
    [({"dtype": "half"}, "dtype"), ({"quantization": "int3"}, "quantization")],
    ids=["dtype", "q"],
)
def test_a_bad_model_config_format_is_refused_naming_the_key(config: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(ModelConfig, config)
    assert info.value.param == key


def test_format_keys_keep_existing_digests() -> None:
    # A config that sets no format has the digest it had before the keys existed (registry reuse).
    assert ModelConfig().digest() == ModelConfig(dtype="auto", quantization="auto").digest()
    assert ModelConfig(quantization="int4").digest() != ModelConfig().digest()


# -- real models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_trained_model_answers_through_the_engine(trained_model: Path, quantization: str) -> None:
    model, tokenizer = _load(trained_model)
    served = apply_generation_format(model, tokenizer, WeightFormat(quantization=quantization), task=CHAT)
    assert (served.quantization, served.dtype, served.device) == (quantization, "bfloat16", "cpu")
    # GPT-2's Conv1D layers became linear layers and were quantized, not left in bfloat16.
    assert served.quantized_layers >= 8
    assert served.agreement is not None and served.agreement >= 0.9
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, torch.nn.Linear) and type(attn.weight).__name__ != "Parameter"
    # int4 keeps the output layer at int8 (as Q4 GGUF files keep theirs at Q8_0).
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    assert served.head == ("int8" if quantization == "int4" else None)
    assert _greedy(model, tokenizer) == TRAINED_ANSWER


def test_int8_quantizes_a_tied_lm_head_and_keeps_the_embedding(tiny_llama: Path) -> None:
    model, tokenizer = _load(tiny_llama)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    embedding = model.model.embed_tokens.weight.detach().clone()
    reference = _greedy(copy.deepcopy(model), tokenizer)
    apply_generation_format(model, tokenizer, WeightFormat(quantization="int8"), task=CHAT)
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    assert torch.equal(model.model.embed_tokens.weight, embedding.to(torch.bfloat16))
    assert _greedy(model, tokenizer) == reference


def test_int4_on_a_model_with_no_quantizable_layer_names_quantization() -> None:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=40, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ConfigError, match="cannot quantize any layer") as info:
        apply_weight_format(model, WeightFormat(quantization="int4"))
    assert info.value.param == "quantization"


def test_a_format_that_breaks_the_answers_is_refused(tiny_gpt2: Path) -> None:
    # Output rows that differ by far less than one int8 step: every greedy choice hinges on differences
    # that int8 rounds away, so its answers are garbage compared with the checkpoint's.
    model, tokenizer = _load(tiny_gpt2)
    generator = torch.Generator().manual_seed(0)
    rows, width = model.lm_head.weight.shape
    with torch.no_grad():
        base = torch.randn(1, width, generator=generator)
        model.lm_head.weight.copy_(base + 1e-4 * torch.randn(rows, width, generator=generator))
    with pytest.raises(ConfigError, match="quantization 'int8' breaks this model") as info:
        apply_generation_format(model, tokenizer, WeightFormat(quantization="int8"), task=CHAT)
    assert info.value.param == "quantization"


def test_the_scheduler_makes_its_tensors_on_the_model_device(trained_model: Path) -> None:
    model, tokenizer = _load(trained_model)
    served = apply_generation_format(model, tokenizer, WeightFormat(device="auto"), task=CHAT)
    engine = GenerationEngine(model, tokenizer, spec=get_task(CHAT), config=ModelConfig(), model_name="m")
    try:
        assert isinstance(engine.scheduler, Scheduler)
        assert str(engine.scheduler.device) == served.device == resolve_device("auto")
    finally:
        engine.close()


def _saved(source: Path | str, tmp_path: Path, **config: Any) -> Path:
    path = tmp_path / "artifact"
    llmadapter.save_model(str(source), path, task=CHAT, model_config=config or None)
    return path


def test_build_engine_applies_model_config_then_server_settings(trained_model: Path, tmp_path: Path) -> None:
    path = _saved(trained_model, tmp_path, quantization="int8", temperature=0)
    logged = build_engine(path)
    assert logged.weight_format == {"dtype": "bfloat16", "quantization": "int8", "device": "cpu"}
    logged.close()
    served = build_engine(path, weight_format=WeightFormat(quantization="int4"))
    try:
        assert served.weight_format == {"dtype": "bfloat16", "quantization": "int4", "device": "cpu"}
        answer = served.run([served.parse({"messages": HELLO, "max_tokens": 100})])[0]
        assert answer.choices[0].message.content == TRAINED_ANSWER  # type: ignore[attr-defined]
    finally:
        served.close()


def test_a_q8_gguf_source_serves_int8_by_default(tiny_gguf: Path, tmp_path: Path) -> None:
    path = _saved(tiny_gguf, tmp_path)
    assert json.loads((path / "llmadapter" / "engine.json").read_text())["source_quantization"] == "int8"
    engine = build_engine(path)
    try:
        assert engine.weight_format == {"dtype": "bfloat16", "quantization": "int8", "device": "cpu"}
    finally:
        engine.close()
    forced = build_engine(path, weight_format=WeightFormat(quantization="none"))
    assert forced.weight_format == {"dtype": "float32", "quantization": "none", "device": "cpu"}
    forced.close()


def test_smollm2_gguf_blocks_read_as_int4(smollm2_gguf: Path) -> None:
    from llmadapter.gguf_convert import gguf_quantization

    assert gguf_quantization(smollm2_gguf) == "int4"  # Q4_1 blocks
