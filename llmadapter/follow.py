"""Serving follows the registry: a server of models:/NAME@ALIAS answers with the version the alias holds.

`ModelHost` is one served model: it resolves its URI, loads the version (`llmadapter.swap.Swapper`),
and, for an alias URI with `alias_poll_s > 0`, starts an `AliasFollower`: a thread that re-resolves the
alias every `alias_poll_s` seconds and at once when poked (an MLflow webhook, `ServedModels.poke`), and
swaps when it points at another version. The CLI's server and the Ray Serve replicas use the same code.

- A version that failed (or was refused) is not tried again until the alias moves to another version
  or `swap_retry_s` has passed.
- Alias deleted: the current version keeps serving; the state says so until the alias is back.
- Registry unreachable: the current version keeps serving; polls back off (doubling, up to 8 polls or
  5 minutes, whichever is longer); one warning when it starts failing, one line when it answers again.
- A URI naming a version (models:/NAME/3), a run or a folder is never re-resolved.
"""

from __future__ import annotations

import logging
import threading
import time

from llmadapter.config import WeightFormat
from llmadapter.engine.base import Engine
from llmadapter.server.served import ServedModels, ServingState
from llmadapter.swap import AliasMissing, Strategy, Swapper, Target, parse_registry_uri, resolve

log = logging.getLogger("llmadapter.follow")

_MAX_BACKOFF_POLLS = 8
_MAX_BACKOFF_S = 300.0


class AliasFollower:
    """Re-resolves models:/NAME@ALIAS on a timer and when poked; swaps when the version changes."""

    def __init__(self, uri: str, swapper: Swapper, *, poll_s: float, retry_s: float) -> None:
        parsed = parse_registry_uri(uri)
        if parsed is None or parsed[1] is None:
            raise ValueError(f"{uri} does not name an alias (models:/NAME@ALIAS)")
        self.uri = uri
        self.registered, self.alias = parsed[0], parsed[1]
        self.swapper = swapper
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = 0  # consecutive failed resolutions
        self._seen: str | None = None  # the version the alias held at the last resolution
        self._failed: dict[str, float] = {}  # version -> when it last failed (monotonic)

    @property
    def _state(self) -> ServingState:
        return self.swapper.served.state(self.swapper.name)

    def start(self) -> None:
        state = self._state
        state.alias, state.following = self.alias, True
        current = self.swapper.current
        self._seen = current.version if current else None
        self.swapper.served.watch(self.registered, self.alias, self.swapper.name, self.poke)
        self._thread = threading.Thread(
            target=self._run, name=f"llmadapter-follow-{self.swapper.name}", daemon=True
        )
        self._thread.start()
        log.info("%s follows %s (every %g s, and on webhooks)", self.swapper.name, self.uri, self.poll_s)

    def poke(self) -> None:
        """Re-resolve now (a webhook said the alias moved)."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _delay(self) -> float:
        if not self._errors:
            return self.poll_s
        longest = max(self.poll_s * _MAX_BACKOFF_POLLS, _MAX_BACKOFF_S)
        return min(self.poll_s * 2 ** min(self._errors, 30), longest)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self._delay())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except Exception:  # never let the thread die: the next poll tries again
                log.exception("%s: following %s failed", self.swapper.name, self.uri)

    def check(self) -> bool:
        """Resolve the alias once and swap if it moved; True when a swap happened."""
        state = self._state
        try:
            target = resolve(self.uri)
        except AliasMissing as exc:
            if state.alias_problem != str(exc):
                log.warning("%s: %s; version %s keeps serving", self.swapper.name, exc, state.version)
            state.alias_problem = str(exc)
            self._errors = 0
            return False
        except Exception as exc:
            self._errors += 1
            if self._errors == 1:
                log.warning(
                    "%s: the registry did not answer (%s: %s); version %s keeps serving, retrying with "
                    "back-off",
                    self.swapper.name,
                    type(exc).__name__,
                    exc,
                    state.version,
                )
            state.alias_problem = f"the registry did not answer: {type(exc).__name__}: {exc}"[:500]
            return False
        if self._errors or state.alias_problem:
            name, alias = self.swapper.name, self.alias
            log.info("%s: the registry answers: @%s is version %s", name, alias, target.version)
        self._errors = 0
        state.alias_problem = None
        return self._follow(target)

    def _follow(self, target: Target) -> bool:
        state = self._state
        if target.version != self._seen:  # the alias moved: earlier failures are retried at once
            self._failed.clear()
            self._seen = target.version
        if target.version == state.version:
            state.swap_failure = None  # e.g. moved back to the serving version after a failed swap
            return False
        failed_at = self._failed.get(target.version)
        if failed_at is not None and time.monotonic() - failed_at < self.retry_s:
            return False
        name, alias = self.swapper.name, self.alias
        log.info("%s: @%s is version %s, serving %s: swapping", name, alias, target.version, state.version)
        if self.swapper.swap(target):
            self._failed.pop(target.version, None)
            return True
        self._failed[target.version] = time.monotonic()
        return False


class ModelHost:
    """One served model: its first load, and (for an alias URI) following the alias."""

    def __init__(
        self,
        served: ServedModels,
        name: str,
        uri: str,
        *,
        poll_s: float = 30.0,
        retry_s: float = 300.0,
        strategy: Strategy = "overlap",
        weight_format: WeightFormat | None = None,
    ) -> None:
        self.name = name
        self.uri = uri
        self.swapper = Swapper(served, name, strategy=strategy, weight_format=weight_format)
        parsed = parse_registry_uri(uri)
        follows = parsed is not None and parsed[1] is not None and poll_s > 0
        self.follower = AliasFollower(uri, self.swapper, poll_s=poll_s, retry_s=retry_s) if follows else None
        if parsed is not None and parsed[1] is not None:
            served.state(name).alias = parsed[1]

    def load(self) -> Engine:
        """Resolve the URI and load what it names now (raises when it cannot)."""
        return self.swapper.load_first(resolve(self.uri))

    def follow(self) -> None:
        """Start following the alias (nothing for a URI that names no alias or when polling is off)."""
        if self.follower is not None:
            self.follower.start()

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self.swapper.close()
