"""prefect.yaml and the flows' parameter schemas: what `prefect deploy` and the UI's run forms get."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from flows.log_and_validate import log_and_validate
from flows.model_refresh import model_refresh
from flows.promote import ApprovalInput, promote
from flows.serve import serve


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _deployments() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((project_root() / "prefect.yaml").read_text())
    flows = {
        "flows/log_and_validate.py:log_and_validate": "log-and-validate",
        "flows/model_refresh.py:model_refresh": "model-refresh",
        "flows/promote.py:promote": "promote",
        "flows/serve.py:serve": "serve",
    }
    return {f"{flows[d['entrypoint']]}/{d['name']}": d for d in config["deployments"]}


def test_the_four_deployments_run_on_a_process_pool_from_this_checkout() -> None:
    config = yaml.safe_load((project_root() / "prefect.yaml").read_text())
    deployments = _deployments()

    assert set(deployments) == {
        "log-and-validate/default",
        "model-refresh/nightly",
        "promote/default",
        "serve/default",
    }
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"llmadapter"}
    (step,) = config["pull"]
    assert list(step) == ["prefect.deployments.steps.set_working_directory"]
    for name, deployment in deployments.items():
        path, _, func = deployment["entrypoint"].partition(":")
        assert f"def {func}(" in (project_root() / path).read_text(), name


def test_no_secret_is_templated_into_prefect_yaml() -> None:
    text = (project_root() / "prefect.yaml").read_text()
    templated = re.findall(r"\{\{\s*([^}]+?)\s*\}\}", text)
    # Resolved at deploy time: only the working directory, from the deploying shell; never blocks,
    # secrets or variables. The promote trigger's parameters are rendered by Prefect from the event
    # that fires it, at run time: only the event's resource name and payload.
    assert templated[0] == "$PWD"
    assert set(templated[1:]) == {"event.resource.name", "event.payload.version"}
    assert not re.search(r"(api[_-]?key|token|password|secret)\s*:", text, re.IGNORECASE)


@pytest.mark.parametrize(
    ("flow", "typed"),
    [
        (log_and_validate, {"source": "string", "save_pretrained": "boolean", "promote": "boolean"}),
        (promote, {"model_name": "string", "timeout_s": "integer", "require_approval": "boolean"}),
        (serve, {"port": "integer", "host": "string"}),
    ],
    ids=["log-and-validate", "promote", "serve"],
)
def test_parameters_are_typed_for_the_ui_form(flow: Any, typed: dict[str, str]) -> None:
    schema = parameter_schema(flow).model_dump_for_openapi()
    properties = schema["properties"]
    for name, kind in typed.items():
        assert properties[name]["type"] == kind, name
    assert all(properties[name].get("description") for name in typed), "descriptions come from the docstring"


def test_log_and_validate_form_has_task_choices_and_nested_models() -> None:
    schema = parameter_schema(log_and_validate).model_dump_for_openapi()
    assert schema["required"] == ["source"]
    task = schema["properties"]["task"]
    choices = task.get("enum") or schema["definitions"][task["$ref"].split("/")[-1]]["enum"]
    assert sorted(choices) == ["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
    definitions = schema["definitions"]
    assert {"ModelConfig", "EmbeddingsConfig", "ValidationOptions"} <= set(definitions)
    assert definitions["ModelConfig"]["properties"]["temperature"]["maximum"] == 2.0


def test_refresh_form_lists_model_specs() -> None:
    schema = parameter_schema(model_refresh).model_dump_for_openapi()
    items = schema["properties"]["models"]["items"]
    assert items["$ref"].endswith("/ModelSpec")


def test_approval_form_is_typed() -> None:
    schema = ApprovalInput.model_json_schema()
    assert schema["properties"]["approve"]["type"] == "boolean"
    assert {"approve", "alias", "approver", "comment"} <= set(schema["properties"])
