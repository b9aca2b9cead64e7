"""The control plane's certificates, kubeconfig, fake nodes and process supervision."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from telerad.devcluster import standin
from telerad.devcluster.nodes import GPU_RESOURCE, fake_nodes, node_is_schedulable
from telerad.devcluster.pki import Pki, write_kubeconfig
from telerad.devcluster.process import ControlPlaneError, Process


def test_pki_chain_usages_and_key_format(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.apiserver_cert.read_bytes())
    admin = x509.load_pem_x509_certificate(pki.admin.cert.read_bytes())
    for leaf in (server, admin):
        leaf.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # Kubernetes reads CN as the user and O as the groups.
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "system:masters"
    )
    # client-go skips PKCS#8 EC keys in --service-account-key-file.
    assert pki.service_account_key.read_text().startswith("-----BEGIN EC PRIVATE KEY-----")
    assert pki.service_account_key.stat().st_mode & 0o077 == 0


def test_kubeconfig_inlines_credentials(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    path = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki.ca_cert, pki.admin)
    config = json.loads(path.read_text())
    user = config["users"][0]["user"]
    assert base64.b64decode(user["client-key-data"]) == pki.admin.key.read_bytes()
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert path.stat().st_mode & 0o077 == 0


def test_fake_nodes_two_cpu_two_gpu_with_taint() -> None:
    nodes = fake_nodes()
    gpu = [n for n in nodes if GPU_RESOURCE in n["status"]["capacity"]]
    assert len(nodes) == 4
    assert len(gpu) == 2
    for node in gpu:
        assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
        assert node["spec"]["taints"][0]["key"] == GPU_RESOURCE


@pytest.mark.parametrize(
    ("status", "taints", "expected"),
    [
        ("True", [], True),
        ("False", [], False),
        ("True", [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}], False),
        ("True", [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}], True),
    ],
)
def test_node_is_schedulable(status: str, taints: list[dict[str, str]], expected: bool) -> None:
    node = {
        "spec": {"taints": taints},
        "status": {"conditions": [{"type": "Ready", "status": status}]},
    }
    assert node_is_schedulable(node) is expected


def test_process_crash_reports_log_tail(tmp_path: Path) -> None:
    proc = Process(
        "crasher",
        [sys.executable, "-c", "import sys; print('bad flag --frobnicate'); sys.exit(3)"],
        tmp_path / "crasher.log",
    ).start()
    assert proc.popen is not None
    proc.popen.wait(timeout=30)
    with pytest.raises(ControlPlaneError, match=r"exited with code 3(.|\n)*bad flag --frobnicate"):
        proc.check_alive()


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and a grandchild: both must be gone after stop().
    script = (
        "import signal, subprocess, sys, time;"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
        "print(c.pid, flush=True); time.sleep(300)"
    )
    log = tmp_path / "group.log"
    proc = Process("group", [sys.executable, "-c", script], log).start()
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(log.read_text().split()[0])
    proc.stop(timeout=1)
    assert proc.popen is not None
    assert proc.popen.returncode is not None
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or (
        Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    )


def pod_with(context: dict[str, object], container: dict[str, object]) -> dict[str, object]:
    return {
        "spec": {
            "securityContext": context,
            "containers": [{"name": "gateway", "securityContext": container}],
        }
    }


def test_confinement_refuses_what_the_pod_does_not_say(tmp_path: Path) -> None:
    """A container that names no user, or runs as root while asking runAsNonRoot, is not
    run as anything at all."""
    with pytest.raises(standin.StandInError, match="names no runAsUser"):
        standin.confine(pod_with({}, {}), "gateway", tmp_path, [])
    root = pod_with({"runAsNonRoot": True, "runAsUser": 0}, {})
    with pytest.raises(standin.StandInError, match="runAsNonRoot"):
        standin.confine(root, "gateway", tmp_path, [])


def test_confinement_shows_the_pods_user_its_software_behind_a_private_directory() -> None:
    """The interpreter and the virtual environment may sit under a directory only its
    owner can enter (a Python under /root): the confinement lets the pod's user reach
    exactly them, as an image would, and binds every volume, read-only where the pod says
    so."""
    if os.geteuid() != 0:
        pytest.skip("confining needs root (CI runs as root)")
    # Not pytest's tmp_path: that is private to root, and the pod's user must reach this.
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        private = base / "private"
        software = private / "python"
        software.mkdir(parents=True)
        venv = private / "venv"  # a second one behind the same directory
        venv.mkdir()
        private.chmod(0o700)
        root = base / "pod"
        (root / "etc" / "telerad").mkdir(parents=True)
        (root / "tmp").mkdir()
        pod = pod_with(
            {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
            {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
             "capabilities": {"drop": ["ALL"]}},
        )  # fmt: skip
        containers = pod["spec"]["containers"]  # type: ignore[index]
        containers[0]["volumeMounts"] = [
            {"name": "config", "mountPath": "/etc/telerad", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108  (the pod's emptyDir)
        ]
        confinement = standin.confine(pod, "gateway", root, [software, venv])
        script = confinement.prefix[confinement.prefix.index("-ec") + 1]
        assert f"mount --move {root}/.image-0 {software}" in script
        assert f"mount --move {root}/.image-1 {venv}" in script
        # Covered once: a second tmpfs over the same directory would hide the first path.
        assert script.count(f"tmpfs {private}") == 1
        assert script.index(f"tmpfs {private}") > script.index(f"{venv} {root}/.image-1")
        assert f"mount -o remount,bind,ro {root}/etc/telerad" in script
        pod_tmp = root / "tmp"
        assert script.index("remount,bind,ro /;") > script.index(f"mount --bind {pod_tmp}")
        assert confinement.env == {"TMPDIR": str(pod_tmp)}
        assert "--reuid=10001" in confinement.prefix
        assert "--no-new-privs" in confinement.prefix
        assert (root / "etc" / "telerad").stat().st_uid == 10001
    finally:
        shutil.rmtree(base)
