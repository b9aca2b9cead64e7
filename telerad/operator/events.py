"""Every reason the operator posts Kubernetes Events with, in one place."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    APPLIED = "Applied"
    """Children were created or brought back to their desired state."""
    READY = "Ready"
    """The object became Ready."""
    NOT_READY = "NotReady"
    """The object stopped being Ready."""
    INVALID_SPEC = "InvalidSpec"
    """The spec cannot be reconciled; nothing was changed."""
    MISSING_SECRET = "MissingSecret"  # noqa: S105  (a reason, not a secret)
    """A Secret the spec names does not exist."""
    SECRET_NOT_GRANTED = "SecretNotGranted"  # noqa: S105  (a reason, not a secret)
    """The namespace does not let the operator read a Secret the spec names."""
    CERTIFICATE_EXPIRING = "CertificateExpiring"
    """The site certificate in the TLS Secret expires within 14 days (still served)."""
    CERTIFICATE_EXPIRED = "CertificateExpired"
    """The site certificate in the TLS Secret has expired: peers refuse it."""
    CERTIFICATE_INVALID = "CertificateInvalid"
    """The TLS Secret's tls.crt holds no PEM certificate: the gateway cannot start."""
    CATALOG_UNAVAILABLE = "CatalogUnavailable"
    """The site's gateway cannot reach its catalog's database (spec.catalog)."""
    REFUSED = "Refused"
    """A RoutingPolicy was not accepted."""
    ACCEPTED = "Accepted"
    """A RoutingPolicy was accepted."""
    PAUSED = "Paused"
    """Reconciliation stopped by the telerad.io/paused annotation."""
    RESUMED = "Resumed"
    """Reconciliation resumed after the pause annotation was removed."""
    SCALED = "Scaled"
    """The autoscaler changed the number of workers."""
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    """The autoscaler cannot read the queue or GPU metrics and holds the replicas."""
    METRICS_RESTORED = "MetricsRestored"
    """The autoscaler reads its metrics again."""
    AUTOSCALER_ASIDE = "AutoscalerStoodAside"
    """Someone else sets the replicas (paused, spec.replicas, an HPA or ScaledObject)."""
    AUTOSCALER_ACTIVE = "AutoscalerActive"
    """The autoscaler sets the replicas again."""
