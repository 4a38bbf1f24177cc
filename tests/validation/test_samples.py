"""llmadapter.validation.samples: user samples parsed (bare request bodies too), built-in samples per task."""

from __future__ import annotations

from typing import Any

import pytest

from llmadapter.catalog import CATALOG
from llmadapter.errors import ConfigError
from llmadapter.validation import ValidationSample
from llmadapter.validation.samples import BUILTIN_SAMPLES, parse_samples

BODY = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (ValidationSample(name="a", request=BODY), ValidationSample(name="a", request=BODY)),
        ({"name": "b", "request": BODY, "expect": "x"}, ValidationSample(name="b", request=BODY, expect="x")),
        ({"request": BODY}, ValidationSample(name="user-0", request=BODY)),
        (BODY, ValidationSample(name="user-0", request=BODY)),
    ],
    ids=["sample", "mapping", "mapping-without-name", "bare-request-body"],
)
def test_user_samples_are_parsed(given: Any, expected: ValidationSample) -> None:
    assert parse_samples([given]) == [expected]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("hello", "samples[0] must be a mapping, got str"),
        ({"name": "", "request": BODY}, "Invalid samples[0].name: String should have at least 1 character"),
        (
            {"name": "a", "request": BODY, "extra": 1},
            "Invalid samples[0].extra: Extra inputs are not permitted",
        ),
    ],
    ids=["not-a-mapping", "empty-name", "unknown-key"],
)
def test_a_bad_user_sample_is_a_config_error_naming_it(given: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_samples([given])
    assert info.value.param == "samples"


@pytest.mark.parametrize("task", sorted(CATALOG), ids=sorted(CATALOG))
def test_every_task_has_builtin_samples_and_the_first_is_greedy_when_generating(task: str) -> None:
    samples = BUILTIN_SAMPLES[task]

    assert samples and len({s.name for s in samples}) == len(samples)
    if CATALOG[task].is_generation:  # the stop and determinism checks reuse the first answer
        assert samples[0].request["temperature"] == 0
