"""The telerad operator: kopf handlers (thin) -> reconcile -> builders (pure) -> api,
with every call to the API server in ``k8s``."""
