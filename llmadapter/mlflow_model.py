"""Save, log and load llm/v1 models: MLflow's Transformers-flavor artifact whose pyfunc is our engine.

The artifact is written by `mlflow.transformers.save_model` (so MLflow tooling reads it as its own:
`flavors.transformers.task`, `inference_task`, `metadata.task`), then the signature is extended with
every parameter our engine accepts and the `python_function` flavor is pointed at this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from llmadapter.artifact_store import store_errors_named
from llmadapter.catalog import TaskSpec, build_signature, get_task, resolve_task, spec_of
from llmadapter.config import (
    EmbeddingsConfig,
    ModelConfig,
    StoredConfig,
    WeightFormat,
    read_stored_config,
    stored_config,
)
from llmadapter.errors import ConfigError, LLMAdapterError
from llmadapter.names import registered_name
from llmadapter.pyfunc import LLMAdapterPyfunc

if TYPE_CHECKING:
    from mlflow.models import Model
    from mlflow.models.model import ModelInfo

    from llmadapter.engine.base import Engine
    from llmadapter.source import ResolvedSource

log = logging.getLogger(__name__)

FLAVOR_NAME = "transformers"
EXTRAS_DIR = "llmadapter"  # our files inside the artifact: engine.json, tokenizer, pooling
_ENGINE_FILE = "engine.json"
_TOKENIZER_DIR = "tokenizer"
_PACKAGE_DIR = Path(__file__).resolve().parent

# Requirements of the loaded model. Explicit, because MLflow's defaults for the Transformers flavor
# pull in torchvision, which has no CPU build here and breaks `mlflow models serve` environments.
_REQUIREMENT_PACKAGES = (
    "mlflow",
    "transformers",
    "torch",
    "tokenizers",
    "safetensors",
    "accelerate",
    "pydantic",
    "numpy",
    "pandas",
)


def default_pip_requirements(inference_task: str | None = None) -> list[str]:
    """Pinned requirements of a logged model, with its task's own (TaskSpec.requirements); no torchvision."""
    spec = spec_of(inference_task) if inference_task else None
    reqs = []
    for name in (*_REQUIREMENT_PACKAGES, *(spec.requirements if spec else ())):
        try:
            version = importlib_metadata.version(name).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0
        except importlib_metadata.PackageNotFoundError:
            continue
        reqs.append(f"{name}=={version}")
    return reqs


# ---------------------------------------------------------------------------------------------
# Save / log
# ---------------------------------------------------------------------------------------------


class SaveOptions(TypedDict, total=False):
    """The keyword arguments of save_model, which log_model passes on (unexplained ones: as in MLflow)."""

    # An llm/v1 task, or a native one (text-generation: chat, feature-extraction: embeddings).
    # Needed for a source (hub id org/name@revision, local folder, .gguf file).
    task: str | None
    # Request defaults, a mapping or the task's config model; validated now (bad keys raise ConfigError).
    model_config: Mapping[str, Any] | StoredConfig | None
    input_example: Any
    # Default: MLflow's llm/v1 signature plus every engine parameter; one given must keep MLflow's fields.
    signature: Any
    # Default True. False stores the hub repo id and commit sha of the loaded snapshot (read locally,
    # nothing asked of the hub) and the tokenizer instead of the weights.
    save_pretrained: bool
    pip_requirements: list[str] | str | None  # default: default_pip_requirements(task)
    extra_pip_requirements: list[str] | str | None
    metadata: dict[str, Any] | None
    code_paths: list[str] | None
    # The `model` of responses (default: the hub id or a given name; log_model: the registered name).
    served_model_name: str | None
    native_pyfunc: bool  # default False; True keeps MLflow's own llm/v1 pyfunc (for comparison only)
    torch_dtype: Any


class LogOptions(SaveOptions, total=False):
    """save_model's keyword arguments, and the ones of MLflow's Model.log that log_model passes on."""

    run_id: str | None
    params: dict[str, Any] | None
    tags: dict[str, Any] | None
    model_type: str | None
    step: int
    model_id: str | None
    resources: Any
    auth_policy: Any
    prompts: Any


def _is_pipeline(obj: Any) -> bool:
    import transformers

    return isinstance(obj, transformers.Pipeline)


def _hub_reference(pipe: Any, source: ResolvedSource | None) -> tuple[str, str] | None:
    """(repo id, commit sha) of a model loaded from the hub cache, read locally, never from the hub."""
    if source is not None:
        return (source.repo_id, source.revision) if source.kind == "hub" and source.repo_id else None
    from llmadapter.source import cached_hub_commit

    name = getattr(pipe.model, "name_or_path", None)
    return cached_hub_commit(name) if name else None


@contextlib.contextmanager
def _pinned_commit(repo: str, sha: str) -> Iterator[None]:
    """MLflow asks the hub for the latest commit when save_pretrained=False (fails offline, and
    records whatever `main` is now, not what was loaded). Answer with the snapshot's own sha."""
    from mlflow.transformers import flavor_config

    original = flavor_config.get_latest_commit_for_repo

    def pinned(name: str) -> str:
        return sha if name == repo else str(original(name))

    flavor_config.get_latest_commit_for_repo = pinned
    try:
        yield
    finally:
        flavor_config.get_latest_commit_for_repo = original


def _local_model_card(pipe: Any) -> Any:
    """A model card from the local snapshot, so saving never fetches one from the hub."""
    from huggingface_hub import ModelCard

    folder = getattr(pipe.model, "name_or_path", "") if pipe is not None else ""
    readme = Path(folder) / "README.md" if folder and Path(folder).is_dir() else None
    if readme is None and pipe is not None and hasattr(pipe.model.config, "_commit_hash"):
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(folder, "README.md", revision=pipe.model.config._commit_hash)
            readme = Path(cached) if isinstance(cached, str) else None
    text = readme.read_text(encoding="utf-8") if readme is not None and readme.is_file() else ""
    return ModelCard(text)


def _gguf_quantization(source: ResolvedSource | None) -> str | None:
    if source is None or source.gguf_file is None:
        return None
    from llmadapter.gguf_convert import gguf_quantization

    return gguf_quantization(source.gguf_file)


def _check_chat_template(tokenizer: Any) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "Task 'llm/v1/chat' needs a tokenizer with a chat template, and this one has none. "
            "Set tokenizer.chat_template, or log with task='llm/v1/completions'.",
            param="task",
        )


def _served_name(pipe: Any, hub: tuple[str, str] | None, source: ResolvedSource | None, fallback: str) -> str:
    """The `model` field of responses: a hub id or a given name, never a local path."""
    if hub is not None:
        return hub[0]
    if source is not None and source.gguf_file is not None:
        return source.gguf_file.stem
    name = str(getattr(getattr(pipe, "model", None), "name_or_path", "") or "")
    if name and not os.path.isabs(name) and not Path(name).exists():
        return name
    return fallback


def save_model(
    transformers_model: Any,
    path: str | os.PathLike[str],
    *,
    mlflow_model: Model | None = None,
    **options: Unpack[SaveOptions],
) -> None:
    """Write an llm/v1 model: MLflow's Transformers-flavor layout, answered by llmadapter's engine.

    transformers_model: a transformers Pipeline, a dict of pipeline components, a source (hub id
        org/name@revision, local model folder, .gguf file), or (for llm/v1/embeddings) a
        sentence-transformers model.
    options: task, model_config, save_pretrained, served_model_name, ... (see SaveOptions).
    """
    import mlflow.transformers
    from mlflow.models import Model

    unknown = sorted(set(options) - SaveOptions.__optional_keys__)  # mypy checks them; a typo fails here
    if unknown:
        raise TypeError(f"save_model() got unexpected keyword arguments: {', '.join(unknown)}")
    task = options.get("task")
    save_pretrained = options.get("save_pretrained", True)
    native_pyfunc = options.get("native_pyfunc", False)
    signature = options.get("signature")
    pipe, pooling, native, source = _as_pipeline(transformers_model, task)
    native_task, spec = resolve_task(task, native)
    config = spec.parse_config(options.get("model_config"))
    if spec.needs_chat_template:
        _check_chat_template(pipe.tokenizer)
    if signature is not None and not native_pyfunc:
        _check_signature(signature, spec)
    hub = _hub_reference(pipe, source)
    if not save_pretrained and hub is None:
        raise ConfigError(
            "save_pretrained=False stores a reference to a Hugging Face hub repository instead of the "
            f"weights, but this model was loaded from '{pipe.model.name_or_path}', which is not a hub "
            "snapshot (no repo id and commit sha). Its weights must be stored: use save_pretrained=True.",
            param="save_pretrained",
        )
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    path = Path(path).absolute()
    reqs = options.get("pip_requirements")
    # Our code travels with the model so a fresh environment loads the same engine.
    user_code = [*(options.get("code_paths") or []), *([] if native_pyfunc else [str(_PACKAGE_DIR)])]
    with _pinned_commit(*hub) if hub and not save_pretrained else contextlib.nullcontext():
        mlflow.transformers.save_model(
            transformers_model=pipe,
            path=str(path),
            task=spec.inference_task,
            mlflow_model=mlflow_model,
            input_example=options.get("input_example"),
            pip_requirements=reqs if reqs is not None else default_pip_requirements(spec.inference_task),
            extra_pip_requirements=options.get("extra_pip_requirements"),
            metadata=options.get("metadata"),
            code_paths=user_code,
            model_config=stored_config(config),
            save_pretrained=save_pretrained,
            model_card=_local_model_card(pipe),
            torch_dtype=options.get("torch_dtype"),
        )
    if native_pyfunc:
        return
    extras = path / EXTRAS_DIR
    extras.mkdir(exist_ok=True)
    # The tokenizer is stored even without weights, so in-memory edits (chat template) survive.
    pipe.tokenizer.save_pretrained(extras / _TOKENIZER_DIR)
    if pooling is not None:
        from llmadapter.engine.embeddings import save_pooling

        save_pooling(pooling, extras)
    info = {
        "inference_task": spec.inference_task,
        "native_task": native_task,
        "served_model_name": options.get("served_model_name") or _served_name(pipe, hub, source, path.name),
        "source": source.source if source else None,
        "source_kind": source.kind if source else ("hub" if hub else None),
        "source_repo": hub[0] if hub else None,
        "source_revision": source.revision if source else (hub[1] if hub else None),
        "weights_stored": bool(save_pretrained),
        # quantization "auto" serves a GGUF source in its own blocks' format (int4 for Q4_x, int8 for Q8_0).
        "source_quantization": _gguf_quantization(source),
        "llmadapter_version": _version(),
    }
    (extras / _ENGINE_FILE).write_text(json.dumps(info, indent=2))
    mlflow_model.signature = signature if signature is not None else build_signature(spec.inference_task)
    pyfunc_conf = mlflow_model.flavors["python_function"]
    pyfunc_conf["loader_module"] = __name__
    pyfunc_conf["streamable"] = spec.is_generation
    mlflow_model.save(str(path / "MLmodel"))


def _version() -> str:
    try:
        return importlib_metadata.version("llmadapter")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def _check_signature(signature: Any, spec: TaskSpec) -> None:
    """A user signature must keep every field of MLflow's llm/v1 signature (else requests lose fields)."""
    from mlflow.transformers.llm_inference_utils import _SIGNATURE_FOR_LLM_INFERENCE_TASK

    required = _SIGNATURE_FOR_LLM_INFERENCE_TASK[spec.inference_task].inputs.input_names()
    missing = [name for name in required if name not in signature.inputs.input_names()]
    if missing:
        raise ConfigError(
            f"The signature lacks fields of the {spec.inference_task} request: {', '.join(missing)}. "
            "Leave signature=None to use the full one.",
            param="signature",
        )


def _as_pipeline(obj: Any, task: str | None) -> tuple[Any, Any, str | None, ResolvedSource | None]:
    """(pipeline, pooling spec or None, the pipeline's own task, resolved source) for every model form."""
    import transformers

    source = None
    if isinstance(obj, str | os.PathLike):
        from llmadapter.source import resolve_source

        if task is None:
            raise ConfigError("Logging a model by source needs task=... (e.g. 'llm/v1/chat').", param="task")
        source = resolve_source(str(obj))
        if source.kind == "hub":
            assert source.repo_id is not None
            # Loaded by repo id at the pinned sha, so save_pretrained=False can reference it.
            obj = {"model": source.repo_id, "revision": source.revision}
        else:
            log.info("Logging %s: its weights are copied into the MLflow artifact.", source.local_dir)
            obj = {"model": str(source.local_dir)}
    # An embeddings model when the task asks for one or the model is one (the pooling comes with it).
    asked = spec_of(task) if task is not None else None
    own = spec_of(str(obj.task)) if _is_pipeline(obj) else None
    if _is_sentence_transformer(obj) or any(s is not None and not s.is_generation for s in (asked, own)):
        from llmadapter.engine.embeddings import prepare_embedding_model

        if isinstance(obj, dict):
            obj = transformers.pipeline("feature-extraction", **obj)
        pipe, pooling = prepare_embedding_model(obj)
        return pipe, pooling, str(pipe.task), source
    if _is_pipeline(obj):
        return obj, None, str(obj.task), source
    if isinstance(obj, dict):
        if "model" not in obj:
            raise ConfigError("A dict of components needs a 'model' entry.", param="transformers_model")
        # Built for the native task the requested one runs on (no task: the model's own).
        native = resolve_task(task, None)[0] if task is not None else None
        pipe = transformers.pipeline(task=native, **obj)
        return pipe, None, str(pipe.task), source
    raise ConfigError(
        "transformers_model must be a transformers Pipeline, a dict of pipeline components, a local "
        "model folder, a hub id (org/name@revision), a .gguf file or a sentence-transformers model; "
        f"got {type(obj).__name__}.",
        param="transformers_model",
    )


def _is_sentence_transformer(obj: Any) -> bool:
    return type(obj).__name__ == "SentenceTransformer" and "sentence_transformers" in type(obj).__module__


class _SavingFlavor:
    """The flavor log_model hands Model.log: this module's save_model, with the model_config bound.

    Model.log passes its `model_config` keyword both to the flavor's save_model and to the run's params,
    which take a plain mapping only; bound here, a typed config reaches save_model as it is.
    """

    def __init__(self, model_config: Mapping[str, Any] | StoredConfig | None) -> None:
        self.__name__ = __name__  # Model.log names the logged model's flavor after it: this module
        self.model_config = model_config

    def save_model(self, **kwargs: Any) -> None:
        save_model(**{**kwargs, "model_config": self.model_config})


def log_model(
    transformers_model: Any,
    name: str | None = None,
    *,
    registered_model_name: str | None = None,
    await_registration_for: int = 300,
    **options: Unpack[LogOptions],
) -> ModelInfo:
    """Log an llm/v1 model to the active MLflow run (options: see SaveOptions, and MLflow's Model.log)."""
    from mlflow.models import Model

    config = options.pop("model_config", None)
    # Responses name the model as clients know it: the registered name when there is one.
    options["served_model_name"] = options.get("served_model_name") or registered_model_name
    # A store that fails mid-upload leaves a partial artifact on a FAILED run; registration comes after
    # the upload (here or in the flows), so nothing is registered.
    with store_errors_named("Logging the model failed, nothing was registered"):
        return Model.log(
            artifact_path=None,
            name=name or "model",
            flavor=_SavingFlavor(config),
            registered_model_name=registered_model_name,
            await_registration_for=await_registration_for,
            transformers_model=transformers_model,
            model_config=config.model_dump(exclude_unset=True)
            if isinstance(config, StoredConfig)
            else config,
            **options,
        )


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def _read_extras(path: Path) -> dict[str, Any]:
    file = path / EXTRAS_DIR / _ENGINE_FILE
    if not file.is_file():
        raise LLMAdapterError(f"{path} was not saved by llmadapter (no {EXTRAS_DIR}/{_ENGINE_FILE}).")
    data: dict[str, Any] = json.loads(file.read_text())
    return data


def _load_components(path: Path, flavor: Mapping[str, Any]) -> tuple[Any, Any]:
    import torch
    import transformers

    model_cls = getattr(transformers, str(flavor.get("pipeline_model_type", "")), None)
    if model_cls is None:
        model_cls = transformers.AutoModel
    dtype: Any = None
    if flavor.get("torch_dtype"):
        dtype = getattr(torch, str(flavor["torch_dtype"]).removeprefix("torch."), None)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if "model_binary" in flavor:
        model = model_cls.from_pretrained(str(path / flavor["model_binary"]), **kwargs)
    else:
        # Weights by reference: the pinned commit from the local Hugging Face cache (or the hub).
        model = model_cls.from_pretrained(
            flavor["source_model_name"], revision=flavor["source_model_revision"], **kwargs
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / EXTRAS_DIR / _TOKENIZER_DIR))
    return model, tokenizer


def _generation_engine(
    model: Any, tokenizer: Any, path: Path, spec: TaskSpec, config: ModelConfig, name: str, load: _Load
) -> Engine:
    from llmadapter.engine.generation import GenerationEngine
    from llmadapter.engine.weights import apply_generation_format

    served = apply_generation_format(
        model,
        tokenizer,
        load.weight_format.over(config.weight_format()),
        task=spec.inference_task,
        source_quantization=load.extras.get("source_quantization"),
        name=name,
    )
    engine = GenerationEngine(model, tokenizer, spec=spec, config=config, model_name=name)
    engine.weight_format = served.card()
    return engine


def _embedding_engine(
    model: Any, tokenizer: Any, path: Path, spec: TaskSpec, config: EmbeddingsConfig, name: str, load: _Load
) -> Engine:
    from llmadapter.engine.embeddings import EmbeddingEngine, load_pooling
    from llmadapter.engine.weights import apply_embedding_format

    served = apply_embedding_format(model, load.weight_format, name=name)
    engine = EmbeddingEngine(
        model, tokenizer, load_pooling(path / EXTRAS_DIR), config=config, model_name=name
    )
    engine.weight_format = served.card()
    return engine


@dataclass(frozen=True)
class _Load:
    """What a load knows beyond the task's config: the artifact's extras, the format asked for."""

    extras: Mapping[str, Any]
    weight_format: WeightFormat


# The engine that answers a task, by the task's config model (so each builder gets the config it takes).
_ENGINES: dict[type[StoredConfig], Callable[..., Engine]] = {
    ModelConfig: _generation_engine,
    EmbeddingsConfig: _embedding_engine,
}


def build_engine(
    path: str | os.PathLike[str],
    *,
    model_config: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    weight_format: WeightFormat | None = None,
) -> Engine:
    """An engine for a local llmadapter artifact folder; model_config overrides the stored one.

    weight_format (the server's dtype / quantization / device settings) wins over the model_config's;
    the model is put into that format by llmadapter.engine.weights.apply_generation_format.
    """
    from mlflow.models import Model

    path = Path(path)
    mlmodel = Model.load(str(path / "MLmodel"))
    extras = _read_extras(path)
    spec = get_task(extras["inference_task"])
    config = read_stored_config(spec.config_model, mlmodel.flavors.get("python_function", {}), model_config)
    model, tokenizer = _load_components(path, mlmodel.flavors[FLAVOR_NAME])
    name = model_name or extras["served_model_name"]
    load = _Load(extras, weight_format or WeightFormat())
    engine = _ENGINES[spec.config_model](model, tokenizer, path, spec, config, name, load)
    engine.model_id = mlmodel.model_id or ""  # the LoggedModel its traces link to
    return engine


def load_engine(
    model_uri: str,
    *,
    model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    weight_format: WeightFormat | None = None,
) -> Engine:
    """Download (if remote) and load an llmadapter model by URI (models:/, runs:/, a path)."""
    from mlflow.artifacts import download_artifacts

    if os.path.isdir(model_uri):
        local = model_uri
    else:
        with store_errors_named(f"Downloading {model_uri} failed"):
            local = download_artifacts(artifact_uri=model_uri)
    return build_engine(
        local,
        model_config=model_config,
        model_name=model_name or registered_name(model_uri),
        weight_format=weight_format,
    )


# ---------------------------------------------------------------------------------------------
# pyfunc
# ---------------------------------------------------------------------------------------------


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> LLMAdapterPyfunc:
    """MLflow's pyfunc loader hook (python_function.loader_module points here)."""
    return LLMAdapterPyfunc(build_engine(path, model_config=model_config))
