"""schemathesis against the OpenAPI description the gateway serves: generated requests
(valid and invalid) to every operation, each answer checked for server errors and against
the documented status codes, media types and schemas.

The gateway holds a real study, so WADO-RS and QIDO-RS answer with data as well as with
404s, and the client's token is sent so requests get past authentication (the check that
requests without it are refused is one of schemathesis' own)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from telerad import synthetic
from telerad.api.config import GatewayConfig
from telerad.api.jobs import LEASE_NOT_HELD
from telerad.runtime.gateway import openapi
from telerad.runtime.gateway.example import example_config
from tests.runtime.conftest import GatewayProcess, free_port, send_datasets


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("openapi")
    config = example_config(free_port(), free_port(), workdir / "data")
    gateway = GatewayProcess(GatewayConfig.model_validate(config.model_dump()), workdir)
    try:
        gateway.start()
        stored = send_datasets(gateway, list(synthetic.ct_series(n_slices=2, size=32, seed=7)))
        assert stored == [0, 0]
        yield gateway
    finally:
        gateway.stop()


@schemathesis.serializer("multipart/related")
def as_is(ctx: object, value: bytes | str) -> bytes:
    """STOW-RS bodies as generated: without a boundary they test the refusals (415);
    stored instances are tested with real DICOM in test_dicomweb."""
    return value if isinstance(value, bytes) else value.encode()


# Loaded from the same function the gateway serves it from (checked below), so the
# operations are known when tests are collected.
schema = schemathesis.openapi.from_dict(openapi.document())
# The token is sent with every request (below), so schemathesis must not also generate or
# leave out an Authorization header of its own: a "missing" one it counts as invalid data
# would arrive with ours and be answered 200. Refusal without a token is its
# `ignored_auth` check, and test_dicomweb covers 401/403 on every operation.
schema.config.generation.update(with_security_parameters=False)
# A Telerad-Job header names a job that is not leased under that token (none is, here):
# 412, as documented, answers it, valid request or not (the header is checked first).
for check in (
    schema.config.checks.positive_data_acceptance,
    schema.config.checks.negative_data_rejection,
):
    check.expected_statuses = [*check.expected_statuses, str(LEASE_NOT_HELD)]


def test_the_gateway_serves_this_description(served: GatewayProcess) -> None:
    assert httpx.get(f"{served.url}/openapi.json").json() == openapi.document()


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("OPENAPI_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.reliability("fuzz", "DICOMweb and job API (schemathesis)")
def test_every_operation_answers_as_described(case: Case, served: GatewayProcess) -> None:
    # A STOW-RS body is DICOM in multipart parts with a boundary, which a schema cannot
    # describe: "valid" generated bodies are not STOW requests, so only their refusal is
    # checked (4xx, documented, as a problem), not that they are taken.
    stow = case.method == "POST" and case.path.startswith("/studies")
    case.call_and_validate(
        base_url=served.url,
        headers=served.auth,
        timeout=30,
        excluded_checks=[positive_data_acceptance] if stow else [],
    )
