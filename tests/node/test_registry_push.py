"""`make image REGISTRY=host/path`: the image is pushed with buildah to a real registry
(Debian's docker-registry, the CNCF distribution server, on a loopback port), and the
registry then serves its manifest and every layer under the tag the command printed."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from tests.node.conftest import ROOT, Image
from tests.postgres import free_port

pytestmark = pytest.mark.timeout(1500)  # it may be the first to build the image

# buildah pushes an OCI manifest unless told otherwise; the registry serves it only to a
# client that accepts that type.
MANIFEST = (
    "application/vnd.oci.image.manifest.v1+json,"
    " application/vnd.docker.distribution.manifest.v2+json"
)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    config = {
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "storage")}},
        "http": {"addr": address},
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    with (tmp_path / "registry.log").open("w") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(tmp_path / "config.yml")], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://{address}/v2/", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "registry.log").read_text()
                assert time.monotonic() < deadline, "the registry did not answer"
                time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_make_image_with_registry_pushes_the_built_image_there(image: Image, registry: str) -> None:
    done = subprocess.run(
        [ROOT / "hack" / "image.sh"],
        env={**os.environ, "REGISTRY": f"{registry}/platform", "REGISTRY_TLS_VERIFY": "false"},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    tag = image.ref.rsplit(":", 1)[1]
    assert done.stdout.strip().splitlines()[-1] == f"{registry}/platform/telerad:{tag}"

    v2 = f"http://{registry}/v2/platform/telerad"
    assert httpx.get(f"{v2}/tags/list").json()["tags"] == [tag]
    got = httpx.get(f"{v2}/manifests/{tag}", headers={"Accept": MANIFEST})
    assert got.status_code == 200, got.text
    manifest = got.json()
    blobs = [manifest["config"], *manifest["layers"]]
    assert len(blobs) > 1
    for blob in blobs:
        head = httpx.head(f"{v2}/blobs/{blob['digest']}")
        assert head.status_code == 200
        assert int(head.headers["Content-Length"]) == blob["size"]
