"""Serving replicas on Ray Serve: a real local Ray instance, two replicas following an alias."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pytest
import yaml
from mlflow.tracking import MlflowClient

import llmadapter
from llmadapter.errors import ConfigError
from llmadapter.processes import free_port
from llmadapter.ray_serve import DEPLOYMENT_NAME, build_app, parse_args
from llmadapter.testing import TRAINED_ANSWER, TRAINED_PROMPT
from tests.conftest import shared_store

ROOT = Path(__file__).resolve().parents[2]
NAME = "ray-chat"
V2_ANSWER = TRAINED_ANSWER.split("fox")[0]


def test_args_are_checked_on_the_driver_with_the_bad_one_named() -> None:
    parsed, settings = parse_args({"model": "models:/a@champion,models:/b/2", "num_replicas": "2"})
    assert parsed.model == ["models:/a@champion", "models:/b/2"] and parsed.served_names() == ["a", "b"]
    assert parsed.num_replicas == 2 and settings == {}
    for args, param in (
        ({"model": "models:/a@x", "replicas": 2}, "replicas"),
        ({"model": "models:/a@x", "alias_poll_s": -1}, "alias_poll_s"),
        ({"model": "models:/a@x", "num_replicas": 0}, "num_replicas"),
        ({"model": ["models:/a@x", "models:/a/2"]}, None),  # both would be served as "a"
        ({"model": "models:/a@x", "num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}, None),
    ):
        with pytest.raises(ConfigError) as failure:
            parse_args(args)
        if param is not None:
            assert failure.value.param == param


def test_the_shipped_serve_config_is_valid_for_ray_and_for_build_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "llmadapter.ray_serve:build_app"
    parsed, settings = parse_args(application.args)
    assert parsed.served_names() == ["chat-model", "minilm-embeddings"]
    assert parsed.autoscaling_config == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 16}
    assert settings["torch_threads"] == 2


def _register(folder: Path, **config: Any) -> str:
    with mlflow.start_run():
        uri = llmadapter.log_model(str(folder), name="model", task="llm/v1/chat", model_config=config or None)
    version = mlflow.register_model(uri.model_uri, NAME).version
    MlflowClient().set_model_version_tag(NAME, str(version), "validation_status", "passed")
    return str(version)


@pytest.fixture(scope="module")
def ray_app(
    tmp_path_factory: pytest.TempPathFactory, trained_model: Path, _mlflow_db_template: Path
) -> Iterator[tuple[str, str, str]]:
    """Two replicas of models:/ray-chat@champion on a local Ray instance; (url, v1, v2)."""
    import ray
    from ray import serve

    root = tmp_path_factory.mktemp("ray")
    with shared_store(root, _mlflow_db_template, "ray") as store:
        v1 = _register(trained_model)
        v2 = _register(trained_model, stop=["fox"])
        MlflowClient().set_registered_model_alias(NAME, "champion", v1)
        env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store, "HF_HUB_OFFLINE": "1"}
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = build_app(
                {
                    "model": f"models:/{NAME}@champion",
                    "num_replicas": 2,
                    "torch_threads": 1,
                    "alias_poll_s": 0.5,
                    "api_key_env": "LLMADAPTER_TEST_NO_SUCH_KEY",
                }
            )
            serve.run(app, route_prefix="/")
            yield f"http://127.0.0.1:{port}", v1, v2
        finally:
            serve.shutdown()
            ray.shutdown()


def _ask(client: openai.OpenAI) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=NAME, messages=[{"role": "user", "content": TRAINED_PROMPT}], temperature=0
    )
    return raw.headers["x-llmadapter-model-version"], raw.parse().choices[0].message.content or ""


def _replicas() -> set[str]:
    """The names of the application's live replica actors (in Ray's `serve` namespace)."""
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"{DEPLOYMENT_NAME}#" in a["name"]
    }


@pytest.mark.slow
def test_replicas_answer_follow_the_alias_and_survive_a_killed_replica(ray_app: tuple[str, str, str]) -> None:
    import ray

    url, v1, v2 = ray_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=3)
    assert _ask(client) == (v1, TRAINED_ANSWER)
    # The same app as `llmadapter serve`: OpenAI errors, /ready detail, streaming.
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": [], "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"]
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": TRAINED_PROMPT}], temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == TRAINED_ANSWER
    assert len(_replicas()) == 2

    # Both replicas follow the alias: after the move, every answer (spread over both) is v2's.
    MlflowClient().set_registered_model_alias(NAME, "champion", v2)
    deadline = time.monotonic() + 120
    while True:
        answers = {_ask(client) for _ in range(8)}
        if answers == {(v2, V2_ANSWER)}:
            break
        assert time.monotonic() < deadline, answers
        time.sleep(0.5)

    # A replica killed under load: clients keep getting answers; Ray starts a replacement.
    answers: list[tuple[str, str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        own = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=3)
        while not stop.is_set():
            try:
                answers.append(_ask(own))
            except Exception as exc:
                failures.append(exc)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    victim = sorted(_replicas())[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    before = len(answers)
    deadline = time.monotonic() + 180
    while len(_replicas()) < 2 or victim in _replicas():
        assert time.monotonic() < deadline, "Ray did not replace the killed replica"
        time.sleep(1)
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert len(answers) > before and set(answers) == {(v2, V2_ANSWER)}
    assert _ask(client) == (v2, V2_ANSWER)  # the new replica loaded the alias's current version
