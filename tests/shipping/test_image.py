"""The container image without a Docker engine: the Dockerfile is linted by hadolint, and
its install step (hack/install-wheel.sh, which the Dockerfile runs) is run here into a
fresh virtual environment whose every entrypoint must start."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_images_are_pinned_and_the_final_stages_run_as_a_user_with_telerad_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    images = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.MULTILINE))
    assert images, "base images are build arguments"
    for name, image in images.items():
        tag = image.rsplit(":", 1)[-1]
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}={image} is not pinned to a version"
    assert 'ENTRYPOINT ["telerad"]' in text
    runtime = text.split("AS runtime", 1)[1]
    (user,) = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot can check it)"
    assert "RUN hack/install-wheel.sh /opt/telerad" in text
    assert text.rstrip().endswith("FROM runtime"), "the default target is the CPU image"


def test_the_wheel_installs_as_the_image_does_and_every_entrypoint_starts(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [str(ROOT / "hack" / "install-wheel.sh"), str(venv)], check=True, capture_output=True
    )
    telerad = venv / "bin" / "telerad"
    for command in ([], ["operator"], ["gateway"], ["worker"], ["crds"], ["token"]):
        done = subprocess.run(
            [str(telerad), *command, "--help"], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, (command, done.stderr)
        assert "Usage: telerad" in done.stdout
    # The model plugins are registered in the installed wheel, not only in the checkout.
    plugins = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "from importlib.metadata import entry_points;"
            "print(sorted(e.name for e in entry_points(group='telerad.models')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert plugins.strip() == "['ct-head-hyperdensity', 'cxr-opacity']"
