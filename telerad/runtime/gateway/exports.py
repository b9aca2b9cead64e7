"""Sending stored instances to one of the site's destinations: STOW-RS (streamed from
disk, byte for byte) or C-STORE (pynetdicom, in the instances' stored transfer syntax).

Used on request (`POST /exports`, a whole study) and by the outbox (a job's results).
"""

from __future__ import annotations

import asyncio
import io
import logging
import ssl
from pathlib import PurePosixPath

import aiohttp
from pydicom import dcmread
from pynetdicom import AE, build_context

from telerad.api.config import GatewayConfig
from telerad.api.jobs import ExportReport, ExportRequest
from telerad.api.site import Destination, DicomPeer
from telerad.api.types import SecretKeyRef
from telerad.runtime import phi
from telerad.runtime.dicomweb import client
from telerad.runtime.store.catalog import Catalog, Located
from telerad.runtime.store.tier import Stored, Tier

log = logging.getLogger(__name__)
EXPORT_TIMEOUT_S = 3600
TIMEOUT = aiohttp.ClientTimeout(total=EXPORT_TIMEOUT_S, sock_connect=10, sock_read=300)
DIMSE_TIMEOUT_S = 60


class ExportError(Exception):
    """The export cannot be done; `status` is the HTTP answer that says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def read_secret(config: GatewayConfig, ref: SecretKeyRef, what: str) -> str:
    """A Secret key the operator mounted under `secretsDir`."""
    if config.secrets_dir is None:
        raise ExportError(502, f"{what}: its secret is not mounted")
    try:
        return (config.secrets_dir / ref.name / ref.key).read_text().strip()
    except OSError:
        raise ExportError(502, f"{what}: its secret cannot be read") from None


class Exporter:
    def __init__(
        self, config: GatewayConfig, catalog: Catalog, tiers: dict[str, Tier], ae_title: str
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.tiers = tiers
        self.ae_title = ae_title

    def destination(self, name: str) -> Destination:
        for destination in self.config.destinations:
            if destination.name == name:
                return destination
        raise ExportError(404, f"the site has no destination {name!r}")

    def files(self, located: list[Located]) -> list[Stored]:
        files = []
        for where in located:
            tier = self.tiers.get(where.tier)
            if tier is None:
                raise ExportError(502, f"the {where.tier} tier is not mounted")
            files.append(Stored(tier, PurePosixPath(where.path), where.size))
        return files

    async def export(self, request: ExportRequest) -> ExportReport:
        destination = self.destination(request.destination)
        files = await asyncio.to_thread(lambda: self.files(self.catalog.locate(request.study)))
        if not files:
            raise ExportError(404, "no such study")
        report = await self.send(destination, files)
        log.info(
            "exported study %s to %s: %d stored, %d failed",
            phi.ref(request.study),
            destination.name,
            report.stored,
            report.failed,
        )
        return report

    async def send(self, destination: Destination, files: list[Stored]) -> ExportReport:
        """Send the files; an unreachable or refusing peer is an ExportError (502)."""
        if destination.dicom is not None:
            return await asyncio.to_thread(self._c_store, destination, destination.dicom, files)
        peer = destination.dicomweb
        if peer is None:  # the API model allows exactly one of the two
            raise ExportError(500, f"destination {destination.name!r} has no peer")
        headers = {}
        if peer.token_secret is not None:
            token = read_secret(self.config, peer.token_secret, f"destination {destination.name!r}")
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                report = await client.store(session, str(peer.url), files, headers=headers)
        except (aiohttp.ClientError, TimeoutError, client.StowError) as exc:
            raise ExportError(502, f"destination {destination.name!r} failed: {exc}") from None
        return ExportReport(
            destination=destination.name,
            status=report.status,
            stored=len(report.stored),
            failed=len(report.failed),
        )

    def _c_store(
        self, destination: Destination, peer: DicomPeer, files: list[Stored]
    ) -> ExportReport:
        datasets = [dcmread(io.BytesIO(stored.read())) for stored in files]
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DIMSE_TIMEOUT_S
        # One context per class and stored syntax: the instances go out as they are.
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        requested = [build_context(sop, syntax) for sop, syntax in sorted(contexts)]
        tls = (ssl.create_default_context(), peer.host) if peer.tls else None
        assoc = ae.associate(
            peer.host, peer.port, contexts=requested, ae_title=peer.ae_title, tls_args=tls
        )
        name = destination.name
        if not assoc.is_established:
            raise ExportError(502, f"destination {name!r}: association not accepted")
        stored = failed = 0
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = status.get("Status") if status else None
                # Success and the warnings (0xB000-0xB007) leave the instance stored.
                if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                    stored += 1
                else:
                    failed += 1
        finally:
            assoc.release()
        if not stored and failed:
            raise ExportError(502, f"destination {name!r} refused every instance")
        return ExportReport(destination=name, status=200, stored=stored, failed=failed)
