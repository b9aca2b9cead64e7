"""Sending a study to one of the site's destinations with STOW-RS, on request.

The stored files go out byte for byte, streamed from disk. Forwarding AI results on its
own, with an outbox and retries, builds on this (the worker issue); C-STORE destinations
come with it, and until then asking for one says so rather than pretending.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path, PurePosixPath

import aiohttp

from telerad.api.config import GatewayConfig
from telerad.api.jobs import ExportReport, ExportRequest
from telerad.api.site import Destination
from telerad.runtime import phi
from telerad.runtime.dicomweb import client
from telerad.runtime.store.catalog import Catalog
from telerad.runtime.store.files import Tier

log = logging.getLogger(__name__)
TIMEOUT = aiohttp.ClientTimeout(total=3600, sock_connect=10, sock_read=300)


class ExportError(Exception):
    """The export cannot be done; `status` is the HTTP answer that says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Exporter:
    def __init__(self, config: GatewayConfig, catalog: Catalog, tiers: dict[str, Tier]) -> None:
        self.config = config
        self.catalog = catalog
        self.tiers = tiers

    def _destination(self, name: str) -> Destination:
        for destination in self.config.destinations:
            if destination.name == name:
                return destination
        raise ExportError(404, f"the site has no destination {name!r}")

    def _token(self, destination: Destination) -> str | None:
        peer = destination.dicomweb
        if peer is None or peer.token_secret is None:
            return None
        if self.config.secrets_dir is None:
            raise ExportError(502, f"destination {destination.name!r}: its token is not mounted")
        path = self.config.secrets_dir / peer.token_secret.name / peer.token_secret.key
        try:
            return path.read_text().strip()
        except OSError:
            raise ExportError(
                502, f"destination {destination.name!r}: its token cannot be read"
            ) from None

    def _files(self, study: str) -> list[Path]:
        files = []
        for where in self.catalog.locate(study):
            tier = self.tiers.get(where.tier)
            if tier is None:
                raise ExportError(502, f"the study's {where.tier} tier is not mounted")
            files.append(tier.path(PurePosixPath(where.path)))
        return files

    async def export(self, request: ExportRequest) -> ExportReport:
        destination = self._destination(request.destination)
        peer = destination.dicomweb
        if peer is None:
            raise ExportError(
                501, "C-STORE destinations are served by results forwarding, not built yet"
            )
        token = self._token(destination)
        files = await asyncio.to_thread(self._files, request.study)
        if not files:
            raise ExportError(404, "no such study")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                report = await client.store(session, str(peer.url), files, headers=headers)
        except (aiohttp.ClientError, TimeoutError, client.StowError) as exc:
            log.warning(
                "export of study %s to %s failed: %s", phi.ref(request.study), destination.name, exc
            )
            raise ExportError(502, f"destination {destination.name!r} failed: {exc}") from None
        log.info(
            "exported study %s to %s: %d stored, %d failed",
            phi.ref(request.study),
            destination.name,
            len(report.stored),
            len(report.failed),
        )
        return ExportReport(
            destination=destination.name,
            status=report.status,
            stored=len(report.stored),
            failed=len(report.failed),
        )
