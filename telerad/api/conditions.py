"""Status conditions, written one way by every controller.

``lastTransitionTime`` moves only when a condition's status changes, so a reconcile that
finds nothing new leaves status byte-identical and triggers no further events.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Final

from telerad.api.types import Condition, ConditionStatus

READY: Final = "Ready"
PROGRESSING: Final = "Progressing"
DEGRADED: Final = "Degraded"
ACCEPTED: Final = "Accepted"
RESOLVED_REFS: Final = "ResolvedRefs"


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.status is ConditionStatus.TRUE


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus | bool,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: datetime.datetime | None = None,
) -> list[Condition]:
    """Return the conditions with ``type_`` set; the others keep their order and values."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    previous = find(conditions, type_)
    if previous is not None and previous.status is status:
        transition = previous.last_transition_time
    else:
        transition = (now or datetime.datetime.now(datetime.UTC)).replace(microsecond=0)
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == type_ else c for c in conditions]


AUTOSCALING: Final = "Autoscaling"
"""AIModel: True while the operator's autoscaler sets the worker replicas; False, with
the reason, while it stands aside (paused, fixed replicas, another autoscaler)."""
METRICS_UNAVAILABLE: Final = "MetricsUnavailable"
"""Reason of an AIModel's Degraded condition while the autoscaler holds for lack of
metrics; the autoscaler alone sets and clears it."""
CATALOG_UNAVAILABLE: Final = "CatalogUnavailable"
"""Reason of an ImagingSite's Degraded condition while its gateway cannot reach its
catalog; also how a gateway that exits for that reason begins its termination message,
which is how the operator tells that exit from others."""
