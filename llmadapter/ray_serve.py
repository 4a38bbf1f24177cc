"""Serving replicas on Ray Serve: `serve run llmadapter.ray_serve:build_app model=models:/name@champion`.

Each replica is one `llmadapter serve` minus the process around it: it loads its models (one engine
each, torch threads set per replica), follows their aliases with the same code (`llmadapter.follow`),
and answers through our FastAPI app as the Ray Serve ingress, so validation, errors, streaming, the
version header, /ready and /metrics are the same. Ray routes requests across replicas, restarts a
replica that dies or fails its health check, and scales replicas with `autoscaling_config`.

Args (Ray's `key=value` CLI arguments, or `args:` in a Serve config file):

- `model`: one model URI or a list (several models in one application: each replica serves them all);
- `name`: the id(s) to serve them under (default: the registered name, as `llmadapter serve`);
- `num_replicas` (default 1) or `autoscaling_config` (Ray's: `min_replicas`, `max_replicas`,
  `target_ongoing_requests`, ...);
- `ray_actor_options` (default `{"num_cpus": <torch_threads>}`; `num_gpus` for GPU replicas);
- `max_ongoing_requests` per replica (default: the server's `max_queue`): Ray's default of 5 would keep
  the engine from batching;
- any `ServerSettings` field (`torch_threads`, `alias_poll_s`, `swap_strategy`, `api_key_env`,
  `request_timeout_s`, ...); unset fields come from LLMADAPTER_* variables in the replica, as usual.

A request in flight on a replica that dies fails (Ray's proxy answers 500, a stream ends without
[DONE]); the other replicas keep answering, and Ray starts a new replica, which loads the alias's
current version. Clients that retry (the openai client does) see no error past the retry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmadapter.errors import ConfigError, first_error
from llmadapter.names import served_name

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

log = logging.getLogger("llmadapter.ray_serve")

DEPLOYMENT_NAME = "llmadapter"


class RayServeArgs(BaseModel):
    """What `build_app` accepts (Ray passes CLI `key=value` pairs as strings; pydantic converts them)."""

    model_config = ConfigDict(extra="forbid")

    model: list[str] = Field(
        min_length=1, description="Model URI(s): models:/name@alias, models:/name/3, ..."
    )
    name: list[str] | None = Field(
        default=None, description="Served id per model (default: registered name)."
    )
    num_replicas: int | None = Field(default=None, ge=1, description="Fixed replica count (default 1).")
    autoscaling_config: dict[str, Any] | None = Field(default=None, description="Ray Serve autoscaling.")
    ray_actor_options: dict[str, Any] | None = Field(default=None, description="Per-replica resources.")
    max_ongoing_requests: int | None = Field(default=None, ge=1, description="Requests per replica at once.")
    settings: dict[str, Any] = Field(default_factory=dict, description="ServerSettings fields.")

    @field_validator("model", "name", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):  # Ray's CLI: model=a or model=a,b
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _checked(self) -> RayServeArgs:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        names = self.served_names()
        if len(names) != len(self.model):
            raise ValueError(f"name given {len(names)} times for {len(self.model)} models")
        if len(set(names)) != len(names):
            raise ValueError(f"two models would be served under one name: {names}; tell them apart with name")
        return self

    def served_names(self) -> list[str]:
        return self.name if self.name is not None else [served_name(uri) for uri in self.model]


def parse_args(args: Mapping[str, Any]) -> tuple[RayServeArgs, dict[str, Any]]:
    """(the deployment's arguments, the ServerSettings fields) from Ray's args; a ConfigError names a
    bad one."""
    from llmadapter.server.settings import ServerSettings

    own = {k: v for k, v in args.items() if k in RayServeArgs.model_fields and k != "settings"}
    settings = {k: v for k, v in args.items() if k in ServerSettings.model_fields}
    unknown = sorted(set(args) - set(own) - set(settings))
    if unknown:
        raise ConfigError(
            f"Unknown build_app argument(s): {', '.join(unknown)}. Known: "
            f"{', '.join(sorted(set(RayServeArgs.model_fields) - {'settings'}))}, and the server settings "
            f"({', '.join(ServerSettings.model_fields)}).",
            param=unknown[0],
        )
    try:
        parsed = RayServeArgs(**own, settings=settings)
        checked = ServerSettings(**settings)  # bad values fail here, on the driver, not in each replica
    except ValidationError as exc:
        first = first_error(exc)
        raise ConfigError(f"build_app argument {first.where}: {first.message}", param=first.where) from None
    return parsed, {k: getattr(checked, k) for k in settings}


class LLMAdapterReplica:
    """One Ray Serve replica: its models loaded and followed, our app as its ASGI ingress."""

    def __init__(self, models: list[tuple[str, str]], settings: dict[str, Any]) -> None:
        from llmadapter.cli import point_mlflow_at_stores, set_torch_threads
        from llmadapter.follow import ModelHost
        from llmadapter.server.app import build_app
        from llmadapter.server.settings import ServerSettings

        self.settings = ServerSettings(**settings)
        set_torch_threads(self.settings.torch_threads)
        point_mlflow_at_stores()
        self._app = build_app({}, self.settings, loading=[name for name, _ in models])
        self.hosts = [
            ModelHost(
                self._app.state.models,
                name,
                uri,
                poll_s=self.settings.alias_poll_s,
                retry_s=self.settings.swap_retry_s,
                strategy=self.settings.swap_strategy,
                weight_format=self.settings.weight_format(),
            )
            for name, uri in models
        ]
        for host in self.hosts:  # a model that cannot load fails the replica: Ray reports and retries it
            host.load()
        for host in self.hosts:
            host.follow()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    def check_health(self) -> None:
        """Ray's health check: every model has an engine (a failed swap keeps the old one: healthy)."""
        missing = [host.name for host in self.hosts if host.name not in self._app.state.models.engines]
        if missing:
            raise RuntimeError(f"no engine for {', '.join(missing)}")

    def __del__(self) -> None:
        for host in getattr(self, "hosts", []):
            host.close()


def build_app(args: dict[str, Any]) -> Application:
    """The Ray Serve application for `serve run llmadapter.ray_serve:build_app model=... [key=value ...]`."""
    from ray import serve

    parsed, settings = parse_args(args)
    from llmadapter.server.settings import ServerSettings

    effective = ServerSettings(**settings)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": parsed.ray_actor_options or {"num_cpus": effective.torch_threads},
        "max_ongoing_requests": parsed.max_ongoing_requests or effective.max_queue,
        # The replica drains like `llmadapter serve` does on SIGTERM.
        "graceful_shutdown_timeout_s": effective.shutdown_grace_s,
    }
    if parsed.autoscaling_config is not None:
        options["autoscaling_config"] = parsed.autoscaling_config
    else:
        options["num_replicas"] = parsed.num_replicas or 1
    deployment: Any = serve.deployment(serve.ingress()(LLMAdapterReplica))
    deployment = deployment.options(**options)
    models = list(zip(parsed.served_names(), parsed.model, strict=True))
    log.info("Ray Serve application: %s", ", ".join(f"{n} <- {u}" for n, u in models))
    return deployment.bind(models, settings)
