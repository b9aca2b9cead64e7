"""The only place that talks to the API server."""

from telerad.operator.k8s.client import Kube, KubeError, contains

__all__ = ["Kube", "KubeError", "contains"]
