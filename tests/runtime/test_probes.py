"""The gateway pod's probes, as the operator renders them, against a real gateway: the
kubelet's requests (no token, no client certificate, no certificate check) must get 200
from a gateway that accepts associations, and readiness must turn 503 while it drains."""

from __future__ import annotations

import copy
import signal
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from telerad.api.site import ImagingSite
from telerad.operator.builders import site as site_builders
from telerad.operator.settings import OperatorSettings
from tests.api_examples import samples
from tests.runtime.conftest import GatewayFactory, GatewayProcess, TlsMaterial

SITES = {e.obj["metadata"]["name"]: e.obj for e in samples() if e.obj["kind"] == "ImagingSite"}


def rendered(name: str) -> tuple[ImagingSite, dict[str, Any], dict[str, Any]]:
    """(site, the gateway container, the gateway's config) as the operator renders them."""
    body = copy.deepcopy(SITES[name])
    body["metadata"].update(namespace="tenant-a", uid=f"uid-{name}", generation=1)
    site = ImagingSite.from_wire(body)
    children = {
        c["kind"]: c
        for c in site_builders.children(body, site, [], OperatorSettings(image="telerad:test"))
    }
    container = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    config = yaml.safe_load(children["ConfigMap"]["data"][site_builders.CONFIG_FILE])
    return site, container, config


def kubelet_probe(
    gateway: GatewayProcess, probe: dict[str, Any], container: Any, config: dict[str, Any]
) -> httpx.Response:
    """The probe's request as the kubelet makes it, to the local gateway: the named port
    must be the one the rendered config serves HTTP on, which here is a free port."""
    get = probe["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[get["port"]] == config["httpPort"]
    scheme = get.get("scheme", "HTTP").lower()  # the kubelet's default is HTTP
    url = f"{scheme}://127.0.0.1:{gateway.config.http_port}{get['path']}"
    return httpx.get(url, timeout=5, verify=False)  # the kubelet verifies nothing


@pytest.mark.parametrize("name", ["riverside-imaging", "st-marys"])
def test_the_rendered_probes_pass_on_a_gateway_configured_alike(
    name: str, start_gateway: GatewayFactory, tls: TlsMaterial
) -> None:
    site, container, config = rendered(name)
    overrides: dict[str, Any] = {}
    if site.spec.tls is not None:  # st-marys: mutual TLS 1.3 on DICOM, HTTPS for HTTP
        files = tls.server_files(mutual=site.spec.tls.require_client_certificate)
        overrides["tls"] = files.model_copy(update={"min_version": site.spec.tls.min_version})
    gateway = start_gateway(**overrides)
    assert (gateway.config.tls is not None) == (config.get("tls") is not None)
    for kind in ("readinessProbe", "livenessProbe"):
        answer = kubelet_probe(gateway, container[kind], container, config)
        assert answer.status_code == 200, (kind, answer.status_code, answer.text)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert kubelet_probe(gateway, container["readinessProbe"], container, config).json()["ready"]


def test_readyz_is_503_while_draining(gateway: GatewayProcess) -> None:
    url = f"{gateway.url}/readyz"
    assert httpx.get(url, timeout=5).json() == {"ready": True, "listening": True, "draining": False}
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert assoc.is_established
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)
    # The running association holds the stop for its grace period; meanwhile the pod must
    # leave its Service.
    gateway.wait_for(lambda: httpx.get(url, timeout=5).status_code != 200, timeout=10)
    answer = httpx.get(url, timeout=5)
    assert answer.status_code == 503
    assert answer.json()["draining"] is True
    # Draining is not dying: the liveness probe must not restart it mid-grace-period.
    live = httpx.get(f"{gateway.url}/livez", timeout=5)
    assert (live.status_code, live.json()["live"]) == (200, True)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0  # the running association still served
    assoc.release()
    assert gateway.proc.wait(30) == 0


def test_after_sigterm_a_gateway_accepts_until_its_service_has_let_it_go(
    start_gateway: GatewayFactory,
) -> None:
    # Its Service (kube-proxy, a cloud load balancer) drops it a moment after /readyz says
    # 503: what it sent meanwhile is served, not refused. Then the port closes.
    gateway = start_gateway(unready_seconds=3)
    assert gateway.proc is not None
    url = f"{gateway.url}/readyz"
    gateway.proc.send_signal(signal.SIGTERM)
    gateway.wait_for(lambda: httpx.get(url, timeout=5).status_code == 503, timeout=5)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    late = ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)
    assert late.is_established, "refused while the Service may still send to it"
    assert int(late.send_c_echo().Status) == 0
    late.release()
    assert gateway.proc.wait(30) == 0
    assert not ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title).is_established
