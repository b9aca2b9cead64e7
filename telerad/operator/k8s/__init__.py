"""The only place that talks to the API server."""

from telerad.operator.k8s.client import Forbidden, Kube, KubeError, contains

__all__ = ["Forbidden", "Kube", "KubeError", "contains"]
