"""The OpenAI-compatible HTTP server: `build_app(engines, settings)` and its `ServerSettings`."""

from llmadapter.server.app import build_app
from llmadapter.server.served import ServedModels
from llmadapter.server.settings import ServerSettings

__all__ = ["ServedModels", "ServerSettings", "build_app"]
