"""Whether a site's gateways reach the catalog that `spec.catalog` names, from what the
gateways themselves say: a running one in its `telerad_gateway_catalog_up` gauge, one
that could not start in its container's termination message. Names of pods and the
gateway's own words about its database only: never a Secret's content, never study data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from telerad.api import conditions as cond
from telerad.operator.autoscale.signals import Sample

Body = dict[str, Any]
CATALOG_UP = "telerad_gateway_catalog_up"
CONTAINER = "gateway"
MESSAGE_MAX = 1024


def exit_message(pod: Body) -> str | None:
    """The termination message of the gateway container's latest exit, when the gateway
    exited because it could not open its catalog and has not been ready since."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != CONTAINER or status.get("ready"):
            continue
        for state in (status.get("state") or {}, status.get("lastState") or {}):
            message = str((state.get("terminated") or {}).get("message") or "").strip()
            if message:
                return message if message.startswith(cond.CATALOG_UNAVAILABLE) else None
    return None


def catalog_up(samples: Sequence[Sample]) -> bool | None:
    """What a gateway's /metrics says of its catalog; None when it says nothing."""
    values = [s.value for s in samples if s.name == CATALOG_UP]
    return all(v >= 1 for v in values) if values else None


def problem(pods: Sequence[Body], scraped: Mapping[str, Sequence[Sample] | None]) -> str | None:
    """Why the site's gateways cannot reach their catalog, or None when none says so.

    `scraped` holds the samples of each gateway pod that was read (None: it did not
    answer). A pod that did not answer says nothing of the catalog, so it is no reason;
    neither is a pod that stopped for another reason."""
    reasons = []
    for pod in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        name = pod["metadata"]["name"]
        samples = scraped.get(name)
        if samples is not None and catalog_up(samples) is False:
            reasons.append(f"gateway pod {name} cannot reach its catalog")
        elif samples is None and (message := exit_message(pod)) is not None:
            reasons.append(f"gateway pod {name} exited: {message}")
    return "; ".join(reasons)[:MESSAGE_MAX] or None
