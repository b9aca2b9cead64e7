"""A real local Kubernetes control plane for tests and development.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake nodes, some
with GPUs) run as plain local processes, built from the Go module proxy by
``hack/build-k8s.sh``. The pytest fixtures and ``make cluster`` share this code.
"""

from telerad.devcluster.controlplane import ControlPlane
from telerad.devcluster.process import ControlPlaneError

__all__ = ["ControlPlane", "ControlPlaneError"]
