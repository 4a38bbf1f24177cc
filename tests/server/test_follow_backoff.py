"""Following when the registry does not answer: keep serving, back off, one warning (not one per poll)."""

from __future__ import annotations

import logging

import pytest

from llmadapter import follow
from llmadapter.follow import AliasFollower
from llmadapter.server.served import ServedModels
from llmadapter.swap import Swapper, Target


def test_an_unreachable_registry_backs_off_with_one_warning_and_recovers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served = ServedModels()
    swapper = Swapper(served, "chat")
    served.state("chat").version = "1"
    follower = AliasFollower("models:/chat@champion", swapper, poll_s=2.0, retry_s=300)
    down = True

    def resolve(uri: str) -> Target:
        if down:
            raise ConnectionError("connection refused")
        return Target(uri="models:/chat/1", version="1")

    monkeypatch.setattr(follow, "resolve", resolve)
    caplog.set_level(logging.INFO, logger="llmadapter.follow")
    delays = []
    for _ in range(10):
        assert follower.check() is False  # nothing swapped: version 1 keeps serving
        delays.append(follower._delay())
    assert delays[:4] == [4.0, 8.0, 16.0, 32.0]
    assert max(delays) == 300.0  # capped: 8 polls or 5 minutes, whichever is longer
    assert "the registry did not answer" in (served.state("chat").alias_problem or "")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]

    down = False
    assert follower.check() is False  # the alias still names the serving version
    assert follower._delay() == 2.0 and served.state("chat").alias_problem is None
    assert any("the registry answers" in r.getMessage() for r in caplog.records)
