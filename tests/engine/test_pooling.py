"""llmadapter.engine.pooling: a model folder whose pooling files are broken is refused, naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmadapter.engine.pooling import POOLING_FILE, load_pooling, read_pooling
from llmadapter.errors import ConfigError

POOLING_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def test_a_pooling_json_with_a_bad_value_names_the_file_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / POOLING_FILE).write_text(json.dumps({"modes": ["median"]}))
    with pytest.raises(ConfigError) as err:
        load_pooling(tmp_path)
    assert err.value.param == "model"
    assert err.value.message.startswith(
        f"{tmp_path / POOLING_FILE} is not a valid pooling spec: Input should be"
    )
    assert "'mean'" in err.value.message


@pytest.mark.parametrize(
    ("files", "bad", "message"),
    [
        ({"modules.json": "{not json"}, "modules.json", "Cannot read {path}: "),
        (
            {"modules.json": json.dumps({"0": "Transformer"})},
            "modules.json",
            "{path} must hold a JSON list of modules.",
        ),
        (
            {"modules.json": json.dumps(POOLING_MODULES), "1_Pooling/config.json": "[1, 2]"},
            "1_Pooling/config.json",
            "{path} must hold a JSON object.",
        ),
    ],
    ids=["unreadable", "modules-not-a-list", "config-not-an-object"],
)
def test_broken_sentence_transformers_files_are_refused_naming_the_file(
    tmp_path: Path, files: dict[str, str], bad: str, message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        read_pooling(tmp_path)
    assert err.value.param == "model"
    assert err.value.message.startswith(message.format(path=tmp_path / bad))
