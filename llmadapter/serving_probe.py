"""Whether running servers answer with a registry version: what a promotion waits for after the alias move.

A server is asked `GET /v1/models/<name>` (with the bearer key, when one is given): its card's `version`
is the version answering there now (llmadapter's servers add it to the OpenAI fields, and every answer
carries it in X-LLMAdapter-Model-Version). A server whose card reports that it failed to swap to the
version (`swap_failure` naming it) is not waited for any longer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

_POLL_S = 0.25


@dataclass
class ServingConfirmation:
    """One server's answer: did it switch to the version, how long after the start of the wait."""

    url: str
    confirmed: bool
    version_seen: str | None = None
    seconds: float | None = None  # from the start of the wait to the first card naming the version
    problem: str | None = None  # why it did not (its swap failure, an HTTP error, the timeout)

    def line(self, version: str) -> str:
        if self.confirmed:
            return f"{self.url}: version {version} answers ({self.seconds:.2f} s)"
        return f"{self.url}: did not switch to version {version} ({self.problem})"


def base_url(url: str) -> str:
    """A server's root from what users paste: http://host:8080, http://host:8080/v1, with slashes."""
    root = url.strip().rstrip("/")
    return root.removesuffix("/v1")


def _card(client: httpx.Client, url: str, name: str) -> tuple[str | None, str | None]:
    """(version, swap_failure) from one server's model card; raises on HTTP errors."""
    answer = client.get(f"{base_url(url)}/v1/models/{name}")
    answer.raise_for_status()
    card = answer.json()
    return card.get("version"), card.get("swap_failure")


def wait_until_serving(
    urls: Sequence[str],
    name: str,
    version: int | str,
    *,
    timeout_s: float = 300.0,
    api_key: str | None = None,
) -> list[ServingConfirmation]:
    """Poll each server until it answers with `version`, says it could not, or `timeout_s` passes."""
    wanted = str(version)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.monotonic()
    deadline = started + timeout_s
    results = {url: ServingConfirmation(url=url, confirmed=False) for url in urls}
    pending = list(urls)
    with httpx.Client(headers=headers, timeout=10.0) as client:
        while pending:
            for url in list(pending):
                result = results[url]
                try:
                    seen, failure = _card(client, url, name)
                except (httpx.HTTPError, ValueError) as exc:
                    result.problem = f"{type(exc).__name__}: {exc}"
                    continue
                result.version_seen = seen
                if seen == wanted:
                    result.confirmed, result.problem = True, None
                    result.seconds = time.monotonic() - started
                    pending.remove(url)
                elif failure and failure.startswith(f"version {wanted}:"):
                    result.problem = f"the server refused the version: {failure}"
                    pending.remove(url)
                else:
                    result.problem = f"still answering with version {seen or '-'}"
            if pending and time.monotonic() >= deadline:
                for url in pending:
                    results[url].problem = f"{results[url].problem}; gave up after {timeout_s:g} s"
                break
            if pending:
                time.sleep(_POLL_S)
    return [results[url] for url in urls]
