"""The name a model loaded by URI is served under: the `model` of its responses and of requests to it."""

from __future__ import annotations

import os
from urllib.parse import urlparse

_REGISTRY_SCHEME = "models:/"


def registered_name(model_uri: str) -> str | None:
    """The registered name of a models:/ URI (models:/chat@champion, models:/chat/3 -> chat), else None."""
    if not model_uri.startswith(_REGISTRY_SCHEME):
        return None
    rest = model_uri.removeprefix(_REGISTRY_SCHEME).lstrip("/")
    return rest.split("@", 1)[0].split("/", 1)[0] or None


def served_name(model_uri: str) -> str:
    """The id a server lists a model URI under: its registered name, else the last part of its path.

    models:/chat@champion -> chat; models:/chat/3 -> chat; runs:/<run>/model -> model;
    /data/smollm2/ -> smollm2. Known before the model is downloaded, so a server can list it while
    it loads.
    """
    name = registered_name(model_uri)
    if name is not None:
        return name
    path = urlparse(model_uri).path if "://" in model_uri or model_uri.startswith("runs:/") else model_uri
    parts = [p for p in path.replace(os.sep, "/").split("/") if p]
    return parts[-1] if parts else model_uri
