"""served_name: the name `llmadapter serve` and `load_engine` give a model loaded by URI."""

from __future__ import annotations

import pytest

from llmadapter.names import served_name


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/chat-model@champion", "chat-model"),
        ("models:/chat-model/3", "chat-model"),
        ("models:/chat-model/latest", "chat-model"),
        ("runs:/0a1b2c/model", "model"),
        ("runs:/0a1b2c/llm/chat", "chat"),
        ("/data/models/smollm2/", "smollm2"),
        ("relative/minilm", "minilm"),
        ("file:///srv/models/tiny", "tiny"),
        ("mlflow-artifacts:/1/abc/artifacts/model", "model"),
    ],
    ids=["alias", "version", "latest", "run", "run-nested", "abs-path", "rel-path", "file-uri", "artifacts"],
)
def test_served_name_defaults(uri: str, expected: str) -> None:
    assert served_name(uri) == expected
