"""llmadapter.server.shutdown in the app: while draining, requests that still arrive get a 503 OpenAI error;
probes and scrapes keep answering. (Signals and the grace, on a real process: tests/faults.)"""

from __future__ import annotations

import httpx

from llmadapter.engine.base import Engine
from llmadapter.server.app import build_app
from tests.server.conftest import CHAT_ID, serve, settings

HELLO = {"model": CHAT_ID, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def test_a_draining_server_refuses_requests_with_503_and_keeps_its_probes(chat_engine: Engine) -> None:
    with serve(build_app({CHAT_ID: chat_engine}, settings())) as running:
        assert httpx.post(f"{running.base_url}/chat/completions", json=HELLO).status_code == 200

        running.app.state.shutdown.begin()  # what the first SIGTERM does

        refused = [
            httpx.post(f"{running.base_url}/chat/completions", json=HELLO),
            httpx.post(f"{running.url}/invocations", json={"inputs": HELLO}),
            httpx.get(f"{running.url}/ready"),
        ]
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert running.metric("llmadapter_errors_total", route="/v1/chat/completions") == 1
    for response in refused:
        assert response.status_code == 503
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "shutting_down")
        assert "shutting down" in error["message"]
