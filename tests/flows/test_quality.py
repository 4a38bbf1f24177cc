"""The quality gate in the flows, with real tiny models, a real MLflow store and real Prefect.

The trained tiny model answers "Hello" with llmadapter.testing.TRAINED_ANSWER; the same weights with a
broken chat template (the messages' text only, no turns) answer something else: a worse challenger.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
from prefect.flow_runs import resume_flow_run

from flows.log_and_validate import log_and_validate
from flows.promote import promote
from llmadapter import registry
from llmadapter.config import ModelConfig
from llmadapter.errors import EvaluationError, QualityGateError
from llmadapter.evaluation import QualityOptions, ScorerSpec
from llmadapter.testing import TRAINED_PROMPT
from tasks.validate import ValidationOptions
from tests.flows import test_promote as promote_tests

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]
in_background = promote_tests.in_background  # the promote flow in a thread (it blocks while paused)
_paused_run_id = promote_tests._paused_run_id

NAME = "tiny-quality"
IN_PROCESS = ValidationOptions(fresh_process=False)
_EXPECTED = ["quick brown fox", "lazy dog", "Café crème", "the fox sleeps", "STOP and END", "naïve façade"]


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evalset") / "hello.jsonl"
    request = {"messages": [{"role": "user", "content": TRAINED_PROMPT}], "temperature": 0, "max_tokens": 60}
    path.write_text(
        "\n".join(
            json.dumps({"id": f"r{i}", "request": request, "expected": e}) for i, e in enumerate(_EXPECTED)
        )
    )
    return path


def _quality(eval_set: Path, *, fresh_process: bool = False, **spec: Any) -> QualityOptions:
    return QualityOptions(
        dataset=str(eval_set),
        scorers=[
            ScorerSpec(name="contains", **spec),
            ScorerSpec(name="answer_length", params={"max_chars": 400}),
        ],
        fresh_process=fresh_process,
        resamples=500,
    )


@pytest.fixture(scope="module")
def broken_template(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("broken") / "trained-broken-template"
    shutil.copytree(trained_model, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return folder


@pytest.fixture(scope="module")
def versions(
    prefect_harness: None, module_store: str, trained_model: Path, broken_template: Path
) -> dict[str, int]:
    """champion (trained), equal (same weights, another model_config), worse (broken chat template)."""
    made = {
        "champion": log_and_validate(source=str(trained_model), model_name=NAME, validation=IN_PROCESS),
        "equal": log_and_validate(
            source=str(trained_model),
            model_name=NAME,
            config=ModelConfig(max_tokens=80),
            validation=IN_PROCESS,
        ),
        "worse": log_and_validate(source=str(broken_template), model_name=NAME, validation=IN_PROCESS),
    }
    return {k: v.version for k, v in made.items()}


@pytest.fixture()
def champion(versions: dict[str, int]) -> dict[str, int]:
    registry.set_alias(NAME, registry.CHAMPION, versions["champion"])
    return versions


def _model_id(version: int) -> str:
    import mlflow.models

    return str(mlflow.models.get_model_info(f"models:/{NAME}/{version}").model_id)


def _artifact_table(key: str) -> list[dict[str, str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    data = found[0].data
    return json.loads(data) if isinstance(data, str) else data


def test_worse_challenger_is_blocked_and_the_evaluation_runs_name_versions_and_data(
    champion: dict[str, int], eval_set: Path
) -> None:
    worse, best = champion["worse"], champion["champion"]
    with pytest.raises(QualityGateError, match="failed the quality gate") as failed:
        promote(
            model_name=NAME,
            version=worse,
            quality=_quality(eval_set, fresh_process=True),
            require_approval=False,
        )

    assert "| contains |" in str(failed.value) and "FAIL" in str(failed.value)
    assert registry.get_alias(NAME, "champion").version == best  # type: ignore[union-attr]
    tags = registry.get_version(NAME, worse).tags
    assert tags["quality.gate"] == "failed"
    score, rest = tags["quality.contains"].split(" ", 1)
    assert float(score) < 1.0 and rest.startswith("(champion 1.000, diff -") and rest.endswith("FAIL")
    assert tags["quality.answer_length"].endswith("pass")
    table = _artifact_table(f"quality-{NAME}-gate")
    assert [(r["scorer"], r["gate"]) for r in table] == [("contains", "FAIL"), ("answer_length", "pass")]

    # Both evaluation runs: linked to their version's LoggedModel, with the evaluation set as input.
    for version in (worse, best):
        runs = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`llmadapter.evaluation_of` = 'models:/{NAME}/{version}'",
            output_format="list",
        )
        assert runs, f"no evaluation run for version {version}"
        inputs = mlflow.get_run(runs[0].info.run_id).inputs
        assert [d.dataset.name for d in inputs.dataset_inputs] == ["hello"]
        assert inputs.dataset_inputs[0].dataset.digest == tags["quality.dataset"].split("@")[1]
        assert [m.model_id for m in inputs.model_inputs] == [_model_id(version)]
    assert (
        tags["quality.run_id"]
        == mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`llmadapter.evaluation_of` = 'models:/{NAME}/{worse}'",
            output_format="list",
        )[0].info.run_id
    )


def test_equal_challenger_passes(champion: dict[str, int], eval_set: Path) -> None:
    decision = promote(
        model_name=NAME, version=champion["equal"], quality=_quality(eval_set), require_approval=False
    )

    assert decision.outcome == "approved" and not decision.quality_overridden
    assert decision.quality is not None and "passed" in decision.quality
    promoted = registry.get_alias(NAME, "champion")
    assert promoted is not None and promoted.version == champion["equal"]
    assert promoted.tags["quality.gate"] == "passed"
    assert promoted.tags["quality.contains"].startswith("1.000 (champion 1.000, diff +0.000")


def test_an_override_in_the_form_promotes_and_records_who(
    champion: dict[str, int], eval_set: Path, in_background: Any
) -> None:
    from prefect.input.run_input import keyset_from_base_key, read_flow_run_input

    worse = champion["worse"]
    run = in_background(
        model_name=NAME, version=worse, quality=_quality(eval_set), poll_interval_s=1, timeout_s=120
    )
    flow_run_id = _paused_run_id()

    description = read_flow_run_input(
        keyset_from_base_key("paused-1")["description"], flow_run_id=flow_run_id
    )
    assert "### Quality gate: FAILED" in description
    contains_row = next(line for line in description.splitlines() if line.startswith("| contains |"))
    assert contains_row.startswith("| contains | 1.000 |") and "| FAIL |" in contains_row
    # Approving a failed gate without saying it is an override is refused; the run stays paused.
    with pytest.raises(Exception, match="override_gate"):
        resume_flow_run(flow_run_id, run_input={"approve": True, "approver": "dave"})
    assert _paused_run_id(timeout_s=5) == flow_run_id
    resume_flow_run(
        flow_run_id,
        run_input={
            "approve": True,
            "override_gate": True,
            "approver": "carol",
            "comment": "known regression",
        },
    )
    run["thread"].join(timeout=120)

    decision = run["state"].result()
    assert decision.outcome == "approved" and decision.quality_overridden
    promoted = registry.get_alias(NAME, "champion")
    assert promoted is not None and promoted.version == worse
    assert promoted.tags["quality.gate"] == "overridden"
    assert promoted.tags["quality.override_by"] == "carol"
    assert promoted.tags["quality.override_comment"] == "known regression"


def test_a_rejected_failed_gate_fails_the_run_and_changes_nothing(
    champion: dict[str, int], eval_set: Path, in_background: Any
) -> None:
    run = in_background(
        model_name=NAME,
        version=champion["worse"],
        quality=_quality(eval_set),
        poll_interval_s=1,
        timeout_s=120,
    )
    resume_flow_run(_paused_run_id(), run_input={"approve": False, "approver": "erin"})
    run["thread"].join(timeout=120)

    assert run["state"].is_failed() and "failed the quality gate" in run["state"].message
    assert registry.get_alias(NAME, "champion").version == champion["champion"]  # type: ignore[union-attr]


def test_bad_quality_input_fails_before_any_model_loads(champion: dict[str, int], tmp_path: Path) -> None:
    rowless = tmp_path / "bad.jsonl"
    rowless.write_text(json.dumps({"id": "a", "expected": "x"}))
    with pytest.raises(EvaluationError, match=r"bad\.jsonl line 1: a row needs exactly one input"):
        promote(model_name=NAME, version=champion["worse"], quality=_quality(rowless), require_approval=False)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "expected": "x"}))
    unknown = QualityOptions(dataset=str(good), scorers=[ScorerSpec(name="Exactness")])
    with pytest.raises(EvaluationError, match="no scorer named 'Exactness'"):
        promote(model_name=NAME, version=champion["worse"], quality=unknown, require_approval=False)
    assert not mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`llmadapter.dataset` LIKE 'good@%'",
        output_format="list",
    )
    assert registry.get_alias(NAME, "champion").version == champion["champion"]  # type: ignore[union-attr]


def test_log_and_validate_registers_nothing_below_the_minimums(
    prefect_harness: None, module_store: str, broken_template: Path, eval_set: Path, versions: dict[str, int]
) -> None:
    before = [v.version for v in registry.list_versions(NAME)]
    with pytest.raises(QualityGateError, match="below the quality minimums; nothing was registered"):
        log_and_validate(
            source=str(broken_template),
            model_name=NAME,
            config=ModelConfig(max_tokens=70),
            validation=IN_PROCESS,
            quality=_quality(eval_set, min_score=0.5),
        )
    assert [v.version for v in registry.list_versions(NAME)] == before


def test_log_and_validate_registers_above_the_minimums_with_quality_tags(
    prefect_harness: None, module_store: str, trained_model: Path, eval_set: Path, versions: dict[str, int]
) -> None:
    result = log_and_validate(
        source=str(trained_model),
        model_name=NAME,
        config=ModelConfig(max_tokens=90),
        validation=IN_PROCESS,
        quality=_quality(eval_set, min_score=0.9),
    )

    assert result.created and result.quality is not None and result.quality.startswith("quality gate passed")
    tags = registry.get_version(NAME, result.version).tags
    assert tags["quality.contains"] == "1.000 pass" and tags["quality.gate"] == "passed"
