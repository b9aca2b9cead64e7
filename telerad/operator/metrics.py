"""The operator's Prometheus metrics. Labels name kinds and results, never objects' data."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "telerad_operator_reconcile_total", "Reconciles by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "telerad_operator_reconcile_seconds",
    "Time to reconcile one object.",
    ["kind", "result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WRITES = Counter(
    "telerad_operator_api_writes_total",
    "Writes sent to the API server, by the kind of object written.",
    ["kind"],
)
MANAGED = Gauge("telerad_operator_objects_managed", "Custom resources served, by kind.", ["kind"])

# The autoscaler's own view of itself (DESIGN.md): labels name models, never studies.
DESIRED_REPLICAS = Gauge(
    "telerad_autoscaler_desired_replicas", "Workers the autoscaler wants.", ["namespace", "model"]
)
DECISIONS = Counter(
    "telerad_autoscaler_decisions_total",
    "Autoscaler decisions by outcome: up, down, steady, hold (metrics unknown), aside.",
    ["namespace", "model", "reason"],
)
SCALER_ERRORS = Counter(
    "telerad_autoscaler_errors_total",
    "Autoscaler ticks that could not read metrics or write the scale.",
    ["namespace", "model", "stage"],
)
METRIC_READ_SECONDS = Histogram(
    "telerad_autoscaler_metric_read_seconds",
    "Time to read one model's queue depth and GPU utilisation.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
