"""The model-refresh flow against a real Hugging Face cache layout, offline (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prefect.server.schemas.schedules import CronSchedule

from flows._params import ModelSpec
from flows.model_refresh import _is_hub_branch, model_refresh
from llmadapter import registry
from llmadapter.testing import HubCache
from tasks.validate import ValidationOptions

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_refresh_registers_only_when_upstream_moved(store: str, hub_cache: HubCache) -> None:
    spec = ModelSpec(
        source=hub_cache.repo_id,
        model_name="tiny-hub",
        validation=ValidationOptions(fresh_process=False),
    )

    first = model_refresh(models=[spec])
    assert [o.outcome for o in first] == ["registered v1"]
    assert registry.get_version("tiny-hub", 1).revision == hub_cache.sha

    unchanged = model_refresh(models=[spec])
    assert [o.outcome for o in unchanged] == ["up to date"]
    assert [v.version for v in registry.list_versions("tiny-hub")] == [1]

    # Upstream pushes a new commit on main (here: a different generation config); the cache's ref moves.
    new_sha = hub_cache.add_commit({"generation_config.json": json.dumps({"max_new_tokens": 7})})
    changed = model_refresh(models=[spec])
    assert [(o.latest_revision, o.outcome) for o in changed] == [(new_sha, "registered v2")]
    latest = registry.get_version("tiny-hub", 2)
    assert latest.revision == new_sha
    assert latest.aliases == ["challenger"]


def test_refresh_reports_a_source_it_cannot_see_offline(store: str, hub_cache: HubCache) -> None:
    outcomes = model_refresh(models=[ModelSpec(source="acme/not-in-the-cache", model_name="ghost")])

    assert [o.outcome for o in outcomes] == ["unknown upstream"]
    assert registry.list_versions("ghost") == []


@pytest.mark.parametrize(
    ("source", "revision", "pinned_by_refresh"),
    [
        ("acme/tiny-gpt2", None, True),
        ("acme/tiny-gpt2", "v1.0", True),
        ("acme/tiny-gpt2@main", None, False),
        ("acme/tiny-gpt2@0123456789abcdef0123456789abcdef01234567", None, False),
    ],
    ids=["default-branch", "revision-branch", "pinned-in-source", "pinned-sha"],
)
def test_only_a_hub_source_that_pins_nothing_itself_is_pinned_by_the_refresh(
    source: str, revision: str | None, pinned_by_refresh: bool
) -> None:
    """The subflow gets the seen sha as `revision`, which a source pinned with '@' would refuse."""
    assert _is_hub_branch(ModelSpec(source=source, revision=revision)) is pinned_by_refresh


def test_a_local_folder_is_not_pinned_by_the_refresh(tiny_gpt2: Path) -> None:
    assert _is_hub_branch(ModelSpec(source=str(tiny_gpt2))) is False


def test_one_bad_model_does_not_stop_the_others_and_fails_the_run(store: str, hub_cache: HubCache) -> None:
    from prefect.artifacts import Artifact

    # A sampling key for an embeddings model: parse_config refuses it before anything else happens.
    bad = ModelSpec(
        source=hub_cache.repo_id, task="llm/v1/embeddings", model_name="bad", config={"temperature": 0}
    )
    good = ModelSpec(
        source=hub_cache.repo_id, model_name="tiny-hub", validation=ValidationOptions(fresh_process=False)
    )

    state = model_refresh(models=[bad, good], return_state=True)

    assert state.is_failed()
    assert "bad" in (state.message or "")
    assert [v.version for v in registry.list_versions("tiny-hub")] == [1]
    assert registry.list_versions("bad") == []
    table = Artifact.get("model-refresh")
    assert table is not None
    rows = {row["model_name"]: row["outcome"] for row in json.loads(str(table.data))}
    assert rows["bad"].startswith("failed: ConfigError")
    assert "temperature" in rows["bad"]
    assert rows["tiny-hub"] == "registered v1"


def test_nightly_deployment_is_a_daily_cron() -> None:
    import yaml

    from tests.flows.test_deployments import project_root

    config = yaml.safe_load((project_root() / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "nightly"]
    (schedule,) = nightly["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    first, second = asyncio.run(cron.get_dates(2))
    assert (second - first).total_seconds() == 24 * 3600
    assert nightly["entrypoint"] == "flows/model_refresh.py:model_refresh"


def test_nightly_models_do_not_share_a_name_with_the_demo_models() -> None:
    """`make run` registers its models from local files; the nightly hub versions must not mix in."""
    import yaml

    from flows.demo import CHAT_MODEL, EMBEDDINGS_MODEL
    from tests.flows.test_deployments import project_root

    config = yaml.safe_load((project_root() / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "nightly"]
    names = [m["model_name"] for m in nightly["parameters"]["models"]]

    assert names == ["smollm2-chat-hub", "minilm-embeddings-hub"]
    assert not {CHAT_MODEL, EMBEDDINGS_MODEL} & set(names)
