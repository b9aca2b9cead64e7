"""How the operator reads a site's catalog reachability from its gateway pods (pure):
the gateways' `telerad_gateway_catalog_up` gauge, and the termination message of one that
could not open its catalog at start."""

from __future__ import annotations

from typing import Any

from telerad.operator import catalog
from telerad.operator.autoscale.signals import Sample, parse


def pod(name: str, *, ready: bool = True, **states: Any) -> dict[str, Any]:
    status = {"name": "gateway", "ready": ready, **states}
    return {"metadata": {"name": name}, "status": {"containerStatuses": [status]}}


def up(value: float) -> list[Sample]:
    return parse(
        "# TYPE telerad_gateway_catalog_up gauge\n"
        f'telerad_gateway_catalog_up{{site="st-marys"}} {value}\n'
        "# TYPE telerad_gateway_free_bytes gauge\n"
        'telerad_gateway_free_bytes{site="st-marys",tier="hot"} 1e9\n'
    )


def crashed(message: str) -> dict[str, Any]:
    return {
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "message": message}},
    }


def test_a_gateway_that_reaches_its_catalog_is_no_problem() -> None:
    assert catalog.problem([pod("gw-a")], {"gw-a": up(1)}) is None


def test_a_gateway_that_reports_its_catalog_down_names_the_pod() -> None:
    found = catalog.problem([pod("gw-a"), pod("gw-b")], {"gw-a": up(1), "gw-b": up(0)})
    assert found == "gateway pod gw-b cannot reach its catalog"


def test_a_gateway_that_could_not_start_says_why() -> None:
    said = "CatalogUnavailable: catalog Secret in /var/run/telerad/catalog has neither 'uri'"
    found = catalog.problem([pod("gw-a", ready=False, **crashed(said))], {})
    assert found == f"gateway pod gw-a exited: {said}"


def test_unknown_is_not_unavailable() -> None:
    """A pod that did not answer, one that says nothing of its catalog, or one that
    exited for another reason is no evidence that the catalog is down."""
    other_exit = pod("gw-c", ready=False, **crashed("cannot start the gateway: port in use"))
    silent = parse('# TYPE telerad_queue_depth gauge\ntelerad_queue_depth{model="m"} 0\n')
    pods = [pod("gw-a"), pod("gw-b"), other_exit, pod("gw-d", ready=False)]
    assert catalog.problem(pods, {"gw-a": None, "gw-b": silent}) is None


def test_a_gateway_ready_again_is_judged_by_its_gauge_not_its_last_exit() -> None:
    earlier = crashed("CatalogUnavailable: connection refused")
    assert catalog.problem([pod("gw-a", **earlier)], {"gw-a": up(1)}) is None
    # Ready again but not answering: the old exit no longer speaks for it.
    assert catalog.problem([pod("gw-a", **earlier)], {"gw-a": None}) is None


def test_the_message_is_bounded() -> None:
    pods = [pod(f"gw-{i:03}") for i in range(100)]
    found = catalog.problem(pods, {p["metadata"]["name"]: up(0) for p in pods})
    assert found is not None
    assert len(found) == catalog.MESSAGE_MAX
