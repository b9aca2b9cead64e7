"""dcmtk's echoscu and storescu against the gateway, plain and over TLS, and the callers
it must refuse, each with the reject reason the standard gives."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx2 as httpx
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from telerad.api.site import AllowedCaller, Dimse

from .conftest import ON_DISK, GatewayFactory, GatewayProcess, TlsMaterial, env_nodelay, tool

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
MR_SMALL = Path(str(get_testdata_file("MR_small.dcm")))


def dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_nodelay(),
        check=False,
    )


def echo(gateway: GatewayProcess, *extra: str, aet: str = "ECHOSCU", aec: str | None = None):
    return dcmtk(
        "echoscu", "-aet", aet, "-aec", aec or gateway.ae_title, *extra, "127.0.0.1",
        str(gateway.port),
    )  # fmt: skip


@ON_DISK
def test_echo_and_store_plain(gateway: GatewayProcess) -> None:
    assert echo(gateway).returncode == 0
    result = dcmtk(
        "storescu", "-aet", "STORESCU", "-aec", gateway.ae_title, "127.0.0.1",
        str(gateway.port), str(CT_SMALL), str(MR_SMALL),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert gateway.metric("telerad_gateway_instances_received_total") == 2
    assert gateway.metric("telerad_gateway_associations_total", result="accepted") == 2
    assert len(list((gateway.hot / "studies").rglob("*.dcm"))) == 2


def test_refusals_carry_the_standard_reasons(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(
        allowed_callers=[
            AllowedCaller(ae_title="ECHOSCU", cidrs=["127.0.0.0/8"]),
            AllowedCaller(ae_title="FARAWAY", cidrs=["10.9.0.0/16"]),
        ]
    )
    unknown = echo(gateway, aet="NOBODY")
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stderr
    # Known AE title, but from a network it is not allowed to send from.
    wrong_network = echo(gateway, aet="FARAWAY")
    assert "Calling AE Title Not Recognized" in wrong_network.stderr
    wrong_called = echo(gateway, aec="SOMEONE_ELSE")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr
    assert gateway.metric("telerad_gateway_rejections_total", reason="unknown-caller") == 2
    assert gateway.metric("telerad_gateway_rejections_total", reason="wrong-called-ae") == 1
    assert echo(gateway).returncode == 0


def test_the_association_limit_is_the_sites_across_every_receiver_process(
    start_gateway: GatewayFactory,
) -> None:
    """Three receiver processes, a limit of four: four callers get in whichever process
    accepts them, the fifth is refused as busy (transient), and once one releases there is
    room again."""
    gateway = start_gateway(receivers=3, dimse=Dimse(max_associations=4))
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)

    def associate() -> Association:
        return ae.associate("127.0.0.1", gateway.port, ae_title=gateway.ae_title)

    held = [associate() for _ in range(4)]
    try:
        assert all(a.is_established for a in held)
        refused = associate()
        assert refused.is_rejected
        busy = "too-many-associations"
        assert gateway.metric("telerad_gateway_rejections_total", reason=busy) == 1
        held.pop().release()
        again = associate()
        assert again.is_established
        held.append(again)
    finally:
        for association in held:
            association.release()
    # Every slot is given back: four at once fit again.
    held = [associate() for _ in range(4)]
    assert all(a.is_established for a in held)
    for association in held:
        association.release()


@pytest.mark.reliability("attack", "plain DIMSE to a TLS site")
def test_tls_echo_and_store_and_plain_refused(
    start_gateway: GatewayFactory, tls: TlsMaterial
) -> None:
    gateway = start_gateway(tls=tls.server_files(mutual=False))
    with_tls = ("+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca))
    assert echo(gateway, *with_tls).returncode == 0
    stored = dcmtk(
        "storescu", *with_tls, "-aet", "STORESCU", "-aec", gateway.ae_title, "127.0.0.1",
        str(gateway.port), str(CT_SMALL),
    )  # fmt: skip
    assert stored.returncode == 0, stored.stderr
    assert gateway.metric("telerad_gateway_instances_received_total") == 1

    plain = echo(gateway)
    assert plain.returncode != 0
    gateway.wait_for(
        lambda: gateway.metric("telerad_gateway_rejections_total", reason="tls-handshake") >= 1
    )
    assert gateway.metric("telerad_gateway_associations_total", result="accepted") == 2

    # The HTTP port is HTTPS with the same certificate; plain HTTP gets no answer.
    assert gateway.get("/studies")[0]["00100020"]["Value"]
    with pytest.raises(httpx.TransportError):
        httpx.get(gateway.url.replace("https:", "http:") + "/healthz", timeout=5)


@pytest.mark.reliability(
    "attack", "mutual TLS: a client certificate expired, of another CA, or none"
)
def test_mutual_tls_refuses_unknown_certificates(
    start_gateway: GatewayFactory, tls: TlsMaterial
) -> None:
    gateway = start_gateway(tls=tls.server_files(mutual=True))
    trusted = ("+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca))
    assert echo(gateway, *trusted).returncode == 0
    stranger = ("+tls", str(tls.stranger_key), str(tls.stranger_cert), "+cf", str(tls.ca))
    assert echo(gateway, *stranger).returncode != 0
    anonymous = ("+tla", "+cf", str(tls.ca))
    assert echo(gateway, *anonymous).returncode != 0
    expired = ("+tls", str(tls.expired_key), str(tls.expired_cert), "+cf", str(tls.ca))
    assert echo(gateway, *expired).returncode != 0
    gateway.wait_for(
        lambda: gateway.metric("telerad_gateway_rejections_total", reason="tls-handshake") >= 3
    )
    assert gateway.metric("telerad_gateway_associations_total", result="accepted") == 1
    # Bearer tokens, not client certificates, authenticate HTTP clients (and probes).
    assert gateway.get("/studies") == []
