"""Names and labels of the objects the operator creates, and their length budget.

Every child name is its owner's name plus a fixed suffix, so the owner's name is capped
(by a CEL rule on the CRD) at 63 characters minus the longest suffix of its kind.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "telerad.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
DNS_LABEL_MAX: Final = 63
FIELD_MANAGER: Final = "telerad-operator"
PART_OF: Final = "telerad"
PAUSED_ANNOTATION: Final = f"{GROUP}/paused"

# Suffixes per owner kind; a Deployment, Service, ServiceAccount, NetworkPolicy and
# ConfigMap of a site may share one name since they are different kinds.
SITE_SUFFIXES: Final = {"gateway": "-gateway", "hot": "-gateway-hot", "warm": "-gateway-warm"}
MODEL_SUFFIXES: Final = {"worker": "-worker"}


def _budget(suffixes: dict[str, str]) -> int:
    return DNS_LABEL_MAX - max(len(s) for s in suffixes.values())


SITE_NAME_MAX: Final = _budget(SITE_SUFFIXES)
MODEL_NAME_MAX: Final = _budget(MODEL_SUFFIXES)
POLICY_NAME_MAX: Final = DNS_LABEL_MAX


def longest(suffixes: dict[str, str]) -> str:
    return max(suffixes.values(), key=len)


def site_child(site: str, part: str) -> str:
    return site + SITE_SUFFIXES[part]


def model_child(model: str, part: str = "worker") -> str:
    return model + MODEL_SUFFIXES[part]


def labels(instance: str, component: str) -> dict[str, str]:
    """The standard labels every child carries; the selector uses name and instance."""
    return {
        "app.kubernetes.io/name": f"telerad-{component}",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        "app.kubernetes.io/part-of": PART_OF,
    }


def selector_labels(instance: str, component: str) -> dict[str, str]:
    full = labels(instance, component)
    return {k: full[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}
