"""One tenant's token opens nothing of another tenant's gateway: every operation the
gateway describes in its OpenAPI document is tried with it."""

from __future__ import annotations

import re

import httpx2 as httpx
import pytest

from tests.runtime.conftest import GatewayFactory

PUBLIC = {"/healthz", "/readyz", "/livez", "/metrics", "/openapi.json"}
# A value for each path parameter that the route's pattern accepts.
SAMPLE = {"job": "1", "study": "1.2.3", "series": "1.2.3.4", "instance": "1.2.3.4.5"}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLE.get(m.group(1), "1"), path)


@pytest.mark.reliability("attack", "tenant A's token on every HTTP operation of tenant B")
def test_a_token_of_another_tenant_is_refused_on_every_operation(
    start_gateway: GatewayFactory,
) -> None:
    a = start_gateway(namespace="tenant-a")
    b = start_gateway(namespace="tenant-b")
    assert a.get("/studies") == []  # the token is good where it belongs
    operations = [
        (method.upper(), path)
        for path, item in httpx.get(f"{b.url}/openapi.json", timeout=10).json()["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    ]
    assert len(operations) >= 15
    tried = 0
    for method, path in operations:
        if path in PUBLIC:
            continue
        answer = httpx.request(
            method, f"{b.url}{concrete(path)}", headers=a.auth, content=b"{}", timeout=10
        )
        assert answer.status_code in (401, 403), (method, path, answer.status_code, answer.text)
        assert "tenant-b" not in answer.text  # the refusal says nothing about B
        tried += 1
    assert tried == len([o for o in operations if o[1] not in PUBLIC])
