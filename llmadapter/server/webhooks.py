"""POST /webhooks/mlflow: MLflow's signed webhook deliveries; an alias that moved is re-resolved at once.

MLflow (3.x, `mlflow/webhooks/delivery.py`) signs each delivery with HMAC-SHA256 over
`<X-MLflow-Delivery-Id>.<X-MLflow-Timestamp>.<body>` under the webhook's secret and sends
`X-MLflow-Signature: v1,<base64 digest>`. A delivery is accepted only when that signature matches the
secret in the environment variable `webhook_secret_env` names, and its timestamp is within
`TOLERANCE_S` of now (a replayed old delivery is refused); a delivery id seen before is acknowledged and
ignored (MLflow retries deliveries that failed). The secret is never logged or echoed.

Events that matter: `model_version_alias.created` / `.deleted` (the followers of that name and alias
re-resolve it) and `model_version_tag.set` (a version's validation status may have changed: every
follower of that name re-resolves). Anything else is acknowledged and ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmadapter.errors import AuthenticationError, InvalidRequestError, NotFoundError
from llmadapter.server.body import parse_object, read_body
from llmadapter.server.served import ServedModels
from llmadapter.server.settings import ServerSettings

log = logging.getLogger("llmadapter.server.webhooks")

PATH = "/webhooks/mlflow"
SIGNATURE = "x-mlflow-signature"
DELIVERY_ID = "x-mlflow-delivery-id"
TIMESTAMP = "x-mlflow-timestamp"
SIGNATURE_VERSION = "v1"
# How far a delivery's timestamp may be from this server's clock (MLflow stamps it when it sends).
TOLERANCE_S = 300
_SEEN_MAX = 10_000


def signature(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    """The X-MLflow-Signature value MLflow sends for this delivery."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class _Seen:
    """Delivery ids accepted within the tolerance window (bounded)."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, delivery_id: str, now: float) -> bool:
        """Remember `delivery_id`; False when it was seen already."""

        def oldest() -> float:
            return next(iter(self._ids.values()))

        while self._ids and (len(self._ids) >= _SEEN_MAX or oldest() < now - TOLERANCE_S):
            self._ids.popitem(last=False)
        if delivery_id in self._ids:
            return False
        self._ids[delivery_id] = now
        return True


def verify(secret: str, headers: Any, body: bytes, now: float) -> str:
    """The delivery id of a delivery whose signature and timestamp are right; raises otherwise."""
    given = headers.get(SIGNATURE)
    if not given:
        raise AuthenticationError(
            f"Unsigned webhook delivery: the {SIGNATURE} header is missing.", code="missing_signature"
        )
    delivery_id = headers.get(DELIVERY_ID) or ""
    stamp = headers.get(TIMESTAMP) or ""
    if not delivery_id:
        raise InvalidRequestError(f"The {DELIVERY_ID} header is missing.", param=DELIVERY_ID)
    try:
        sent = int(stamp)
    except ValueError:
        raise InvalidRequestError(
            f"The {TIMESTAMP} header must be a unix timestamp in seconds.", param=TIMESTAMP
        ) from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("The webhook body is not valid UTF-8.", param=None) from None
    expected = signature(secret, delivery_id, stamp, text).encode()
    # MLflow sends one "v1,<sig>"; accept any of several space-separated ones (a secret being rotated).
    if not any(hmac.compare_digest(candidate.encode(), expected) for candidate in given.split()):
        raise AuthenticationError("The webhook signature does not match.", code="invalid_signature")
    if abs(now - sent) > TOLERANCE_S:
        raise InvalidRequestError(
            f"The webhook's {TIMESTAMP} is {abs(now - sent):.0f} s from this server's clock (more than "
            f"{TOLERANCE_S} s): refused as stale or replayed.",
            param=TIMESTAMP,
            code="stale_timestamp",
        )
    return delivery_id


def _targets(event: dict[str, Any]) -> tuple[str, str | None] | None:
    """(registered name, alias or None for every alias) that a delivery concerns, or None."""
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    kind = (event.get("entity"), event.get("action"))
    if kind in (("model_version_alias", "created"), ("model_version_alias", "deleted")):
        alias = data.get("alias")
        return (data["name"], alias) if isinstance(alias, str) else None
    if kind == ("model_version_tag", "set"):
        return data["name"], None
    return None


def router(models: ServedModels, settings: ServerSettings) -> APIRouter:
    webhooks = APIRouter()
    seen = _Seen()

    @webhooks.post(PATH, include_in_schema=False)
    async def mlflow_webhook(request: Request) -> Response:
        secret = settings.webhook_secret()
        if secret is None:
            raise NotFoundError(
                f"MLflow webhooks are off on this server: set ${settings.webhook_secret_env} to the "
                "webhook's secret.",
                code="webhooks_disabled",
            )
        body = await read_body(request, settings.max_body_bytes)
        now = time.time()
        delivery_id = verify(secret, request.headers, body, now)
        if not seen.add(delivery_id, now):
            return _answer({"status": "duplicate", "delivery_id": delivery_id})
        event = parse_object(body)
        target = _targets(event)
        if target is None:
            return _answer({"status": "ignored", "delivery_id": delivery_id})
        name, alias = target
        poked = models.poke(name, alias)
        log.info(
            "webhook %s.%s for %s@%s (delivery %s): re-resolving %s",
            event.get("entity"),
            event.get("action"),
            name,
            alias or "*",
            delivery_id,
            ", ".join(poked) or "nothing (not followed here)",
        )
        status = "accepted" if poked else "ignored"
        return _answer({"status": status, "delivery_id": delivery_id, "models": poked})

    return webhooks


def _answer(body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), media_type="application/json")
