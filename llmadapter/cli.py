"""The `llmadapter` command line: `llmadapter serve MODEL_URI [...]` runs the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import logging
import logging.config
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llmadapter.errors import first_error
from llmadapter.names import served_name

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from llmadapter.follow import ModelHost
    from llmadapter.server.settings import ServerSettings

log = logging.getLogger("llmadapter.cli")


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    # One flag per ServerSettings field, so the CLI, the environment and the code never drift apart.
    from llmadapter.server.settings import ServerSettings

    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LLMADAPTER_{name.upper()}"
        parser.add_argument(
            flag, dest=name, default=None, metavar=name.upper(), help=f"{field.description} [${env}]"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmadapter", description="llm/v1 MLflow models, served OpenAI-style."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="Serve MLflow models on an OpenAI-compatible HTTP API.",
        description="Serve llmadapter MLflow models (models:/name@alias, models:/name/3, runs:/..., a local "
        "path) on /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /invocations, "
        "/health, /ready and /metrics. One process (one uvicorn worker) owns the cores; concurrent "
        "requests are batched by the engine. Scale out with replicas behind a load balancer.",
    )
    serve.add_argument(
        "model_uris", nargs="+", metavar="MODEL_URI", help="MLflow model URI or local model folder."
    )
    serve.add_argument(
        "--name",
        action="append",
        dest="names",
        metavar="NAME",
        help="Id to serve a model under (the request's `model`); once per MODEL_URI, in order. "
        "Default: the registered model name for models:/ URIs, else the path's last part.",
    )
    _settings_flags(serve)
    return parser


def _serve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerSettings:
    from llmadapter.server.settings import ServerSettings

    given = {
        name: getattr(args, name) for name in ServerSettings.model_fields if getattr(args, name) is not None
    }
    try:
        settings = ServerSettings(**given)
    except ValidationError as exc:
        first = first_error(exc)
        parser.error(f"--{first.where.replace('_', '-')}: {first.message}")
    # An explicitly named key variable that is unset would silently open the server: refuse.
    if "api_key_env" in given and not settings.api_key():
        parser.error(f"--api-key-env: the environment variable ${settings.api_key_env} is not set or empty.")
    return settings


def _model_ids(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    uris: list[str] = args.model_uris
    names: list[str] = args.names or [served_name(uri) for uri in uris]
    if len(names) != len(uris):
        parser.error(f"--name given {len(names)} times for {len(uris)} model URIs; give it once per URI.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        parser.error(f"two models would be served as {', '.join(duplicates)}; tell them apart with --name.")
    return names


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    log.info("torch uses %d threads", threads)


def point_mlflow_at_stores() -> None:
    """models:/ and runs:/ URIs resolve against the project's stores (LLMADAPTER_* / MLFLOW_* / default),
    and a tracking server that does not answer fails the load within our HTTP limits."""
    import mlflow

    from llmadapter.settings import apply_mlflow_http_settings, get_settings

    project = get_settings()
    apply_mlflow_http_settings(project)
    mlflow.set_tracking_uri(project.resolved_tracking_uri())
    mlflow.set_registry_uri(project.resolved_registry_uri())


def _load_models(app: FastAPI, server: uvicorn.Server, hosts: Sequence[ModelHost], failed: list[str]) -> None:
    """Load each model and add it to the running app (/ready turns 200 after the last), then follow the
    aliases; stop the server when a first load fails."""
    for host in hosts:
        try:
            log.info("loading %s from %s", host.name, host.uri)
            engine = host.load()
        except Exception as exc:
            log.exception("could not load %s from %s", host.name, host.uri)
            failed.append(f"{host.name}: {exc}")
            server.should_exit = True
            return
        log.info("%s ready (%s, version %s)", host.name, engine.inference_task, engine.model_version or "-")
    for host in hosts:
        host.follow()


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = _serve_settings(args, parser)
    names = _model_ids(args, parser)
    import uvicorn

    from llmadapter.follow import ModelHost
    from llmadapter.server.app import build_app
    from llmadapter.server.observe import log_config
    from llmadapter.server.shutdown import GracefulServer

    # Every line, uvicorn's and ours, shows the id of the request it was written for.
    logging.config.dictConfig(log_config(settings.log_level))

    set_torch_threads(settings.torch_threads)
    point_mlflow_at_stores()
    app = build_app({}, settings, loading=names)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        # The standard loop and HTTP parser whatever else is installed (ray[serve] brings uvloop and
        # httptools): the drain, the signal handling and the tests run on what they were built on.
        loop="asyncio",
        http="h11",
    )
    # SIGTERM / SIGINT: drain within shutdown_grace_s, then return here (see llmadapter.server.shutdown).
    server = GracefulServer(config, app.state.shutdown)
    # One host per model: its first load, then (models:/NAME@ALIAS) following the alias.
    hosts = [
        ModelHost(
            app.state.models,
            name,
            uri,
            poll_s=settings.alias_poll_s,
            retry_s=settings.swap_retry_s,
            strategy=settings.swap_strategy,
            weight_format=settings.weight_format(),
        )
        for name, uri in zip(names, args.model_uris, strict=True)
    ]
    failed: list[str] = []
    # Models load in the background so that /health answers at once and /ready tells when they are in.
    loader = threading.Thread(
        target=_load_models, args=(app, server, hosts, failed), name="llmadapter-loader", daemon=True
    )
    loader.start()
    try:
        server.run()
    finally:
        loader.join(timeout=1)
        closed = [host.name for host in hosts if host.name in app.state.models.engines]
        for host in hosts:
            host.close()
        log.info("closed %d engine(s): %s", len(closed), ", ".join(closed) or "none")
    if failed:
        print(f"llmadapter serve: could not load {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers: dict[str, Any] = {"serve": serve}
    return int(handlers[args.command](args, parser))


if __name__ == "__main__":
    sys.exit(main())
