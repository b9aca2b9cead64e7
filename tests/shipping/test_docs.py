"""The architecture picture in the README matches the code: every component it draws names
a package that exists, every main package is drawn, and the committed SVG was rendered
from the current source (hack/render-architecture.sh)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# The parts of telerad a platform team runs or reads about; each must be in the picture.
COMPONENTS = {
    "telerad/operator",
    "telerad/operator/autoscale",
    "telerad/runtime/gateway",
    "telerad/runtime/store",
    "telerad/runtime/routing.py",
    "telerad/runtime/worker",
    "telerad/runtime/models",
    "telerad/runtime/results",
}


def test_every_drawn_component_exists_and_every_component_is_drawn() -> None:
    source = (DOCS / "architecture.dot").read_text()
    drawn = set(re.findall(r'module="([^"]+)"', source))
    assert drawn == COMPONENTS
    for module in drawn:
        assert (ROOT / module).exists(), module


def test_the_committed_picture_is_rendered_from_the_current_source() -> None:
    source = (DOCS / "architecture.dot").read_bytes()
    svg = (DOCS / "architecture.svg").read_text()
    recorded = re.search(r"<!-- source: architecture.dot sha256:([0-9a-f]{64}) -->", svg)
    assert recorded is not None, "render it with hack/render-architecture.sh"
    assert recorded.group(1) == hashlib.sha256(source).hexdigest(), (
        "docs/architecture.dot changed: run hack/render-architecture.sh"
    )
    assert (DOCS / "architecture.png").stat().st_size > 10_000
    assert "architecture.svg" in (ROOT / "README.md").read_text()


def test_the_catalog_guide_examples_are_valid_sites() -> None:
    """docs/catalog.md: each ImagingSite it shows is one the API accepts, and the
    CloudNativePG one names the Secret its Cluster creates (`<cluster>-app`)."""
    from telerad.api.site import ImagingSite  # noqa: PLC0415  (the shipping tests import little)

    text = (DOCS / "catalog.md").read_text()
    documents = [
        d
        for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
        for d in yaml.safe_load_all(block)
    ]
    sites = [ImagingSite.from_wire(d) for d in documents if d["kind"] == "ImagingSite"]
    assert len(sites) == 2
    (cluster,) = [d for d in documents if d["kind"] == "Cluster"]
    refs = {s.spec.catalog.secret_ref.name for s in sites if s.spec.catalog is not None}
    assert f"{cluster['metadata']['name']}-app" in refs
