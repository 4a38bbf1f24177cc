"""The name a model loaded by URI is served under: the `model` of its responses and of requests to it."""

from __future__ import annotations

import os
from urllib.parse import urlparse

_REGISTRY_SCHEME = "models:/"


def served_name(model_uri: str) -> str:
    """The registered name for models:/ URIs, else the last part of the URI's path.

    models:/chat@champion -> chat; models:/chat/3 -> chat; runs:/<run>/model -> model;
    /data/smollm2/ -> smollm2. Known before the model is downloaded, so a server can list it while
    it loads.
    """
    if model_uri.startswith(_REGISTRY_SCHEME):
        rest = model_uri.removeprefix(_REGISTRY_SCHEME).lstrip("/")
        return rest.split("@", 1)[0].split("/", 1)[0]
    path = urlparse(model_uri).path if "://" in model_uri or model_uri.startswith("runs:/") else model_uri
    parts = [p for p in path.replace(os.sep, "/").split("/") if p]
    return parts[-1] if parts else model_uri
