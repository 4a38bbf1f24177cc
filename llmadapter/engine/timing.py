"""When each sequence arrived, queued, was scheduled, produced each token and finished: the engine's facts.

The scheduler stamps these (one clock read per step, shared by every row of the batch, as vLLM does);
observers read them once the sequence has finished. Nothing here observes a metric: that happens off
the scheduler thread (`llmadapter.server.observe`). Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class SequenceTimes:
    """The life of one sequence; a stamp that never happened stays None."""

    arrival: float = field(default_factory=time.perf_counter)  # the request reached the server
    queued: float | None = None  # submitted to the scheduler
    scheduled: float | None = None  # admitted to the batch: its prefill starts
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive tokens (inter-token latency)

    def token(self, now: float) -> None:
        """A token was chosen at `now` (the end of its forward step)."""
        if self.last_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now
