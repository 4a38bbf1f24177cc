"""Flow parameters: the default registered name a source and task give."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows._params import ModelSpec, default_model_name


@pytest.mark.parametrize(
    ("source", "task", "name"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm/v1/chat", "smollm2-135m-instruct-chat"),
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct@main",
            "llm/v1/completions",
            "smollm2-135m-instruct-completions",
        ),
        ("sentence-transformers/all-MiniLM-L6-v2", "llm/v1/embeddings", "all-minilm-l6-v2-embeddings"),
        ("gpt2", "llm/v1/chat", "gpt2-chat"),
    ],
    ids=["hub-id", "pinned-hub-id", "embeddings", "no-org"],
)
def test_a_hub_id_names_the_model_after_its_repo(source: str, task: str, name: str) -> None:
    assert default_model_name(source, task) == name
    assert ModelSpec(source=source, task=task).registered_name() == name


def test_a_file_or_folder_names_the_model_after_its_stem(tmp_path: Path) -> None:
    folder = tmp_path / "My_Finetune.v2"
    folder.mkdir()
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")

    assert default_model_name(f"{folder}/", "llm/v1/chat") == "my-finetune-v2-chat"
    assert default_model_name(str(gguf), "llm/v1/chat") == "smollm2-135m-instruct-q4-1-chat"
    assert ModelSpec(source=str(gguf), model_name="mine").registered_name() == "mine"


@pytest.mark.parametrize("source", ["./no/such/model", "acme/model@", "not a repo id!"])
def test_a_source_that_does_not_parse_still_gets_a_name(source: str) -> None:
    """The refresh flow names the failure row of such a source; the download step reports the error."""
    assert default_model_name(source, "llm/v1/embeddings") == "model-embeddings"
