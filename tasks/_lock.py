"""The registration lock: one Prefect global concurrency limit (one slot) per registered name, across workers.

Flow runs registering the same name (two schedules, a schedule and a person, on any worker sharing the
Prefect API) find and register one at a time, so the second finds the version the first registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator

from llmadapter.runs import RunOwner
from tasks._owners import current_owner, reason_over
from tasks.validate import artifact_key

# A registration holds its name's slot for a find and a register: about a second. A holder killed with
# SIGKILL keeps it until its lease expires (Prefect's shortest, renewed while held) on a server, and for
# ever on the ephemeral API, whose leases live in the memory of the process that died with it. So the
# holder is recorded (a Prefect variable of the same name), and a waiter frees a slot whose recorded
# holder is over (tasks._owners), or any slot held past TAKEOVER_S: no registration takes that long,
# and the registry's own check keeps one version even if two ever register at once.
LEASE_S = 60.0
ATTEMPT_S = 5.0  # how long one attempt to take the slot waits before the holder is looked at
TAKEOVER_S = 180.0


def registration_lock_name(model_name: str) -> str:
    """The Prefect global concurrency limit (and holder variable) of a registered name."""
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return f"{artifact_key('llmadapter-register', model_name)[:80]}-{digest}"


@contextlib.contextmanager
def registration_lock(model_name: str, takeover_after_s: float = TAKEOVER_S) -> Iterator[None]:
    """Hold the one slot of `model_name`'s registration limit (created when missing, limit 1), across
    processes and workers that share the Prefect API; a slot abandoned by a killed holder is freed."""
    from prefect.concurrency.sync import concurrency
    from prefect.variables import Variable

    limit = registration_lock_name(model_name)
    _ensure_limit(limit)
    waiting_since = time.monotonic()
    while True:
        # Looked at before each attempt: a slot abandoned by a killed holder is freed without waiting.
        if _free_if_abandoned(limit, time.monotonic() - waiting_since, takeover_after_s):
            waiting_since = time.monotonic()
        held = contextlib.ExitStack()
        try:
            held.enter_context(
                concurrency(
                    limit,
                    occupy=1,
                    timeout_seconds=ATTEMPT_S,
                    lease_duration=LEASE_S,
                    # A limit someone disabled (`prefect gcl disable`) turns the lock off instead of failing,
                    # and a renewal hiccup must not cancel a registration (the registry checks anyway).
                    strict=False,
                    raise_on_lease_renewal_failure=False,
                )
            )
            break
        except TimeoutError:
            continue
    with held:
        Variable.set(limit, current_owner().model_dump(mode="json"), overwrite=True)
        try:
            yield
        finally:
            Variable.unset(limit)


def _ensure_limit(limit: str) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it just now
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))


def _free_if_abandoned(limit: str, waited_s: float, takeover_after_s: float) -> bool:
    """Free the taken slot when its recorded holder is over, or once `waited_s` passed
    `takeover_after_s`; True when it was freed.

    Two waiters may both free it (the second then frees the first one's slot): the lock is an
    optimisation over the registry's own check, which keeps one version regardless.
    """
    from prefect import get_client
    from prefect.variables import Variable

    with get_client(sync_client=True) as client:
        current = client.read_global_concurrency_limit_by_name(limit)
        if current.active_slots < current.limit:
            return False
        record = Variable.get(limit)
        try:
            holder = RunOwner.model_validate(record) if record else None
        except ValueError:
            holder = None
        reason = reason_over(holder) if holder is not None else None
        if reason is not None:
            why = f"its holder is over: {reason}"
        elif waited_s > takeover_after_s:
            why = f"held for more than {takeover_after_s:.0f} s by {holder or 'a holder that left no record'}"
        else:
            return False
        _logger().warning("Registration lock %s: %s; freeing its slot.", limit, why)
        client.release_concurrency_slots([limit], slots=1, occupancy_seconds=max(waited_s, 1.0))
    Variable.unset(limit)
    return True


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The task's run logger (shown in the Prefect UI), or a plain one outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
