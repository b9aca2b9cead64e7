#!/usr/bin/env bash
# Render docs/architecture.dot to docs/architecture.svg and docs/architecture.png (Graphviz:
# apt-get install graphviz). The SVG records the source's hash, so a test can tell when the
# committed picture no longer matches its source.
set -euo pipefail
cd "$(dirname "$0")/../docs"
hash="$(sha256sum architecture.dot | cut -d' ' -f1)"
dot -Tsvg architecture.dot | sed "2i <!-- source: architecture.dot sha256:${hash} -->" > architecture.svg
dot -Tpng -Gdpi=110 architecture.dot > architecture.png
