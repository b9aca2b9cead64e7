"""The architecture picture in the README matches the code: every component it draws names
a package that exists, every main package is drawn, and the committed SVG was rendered
from the current source (hack/render-architecture.sh)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

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
