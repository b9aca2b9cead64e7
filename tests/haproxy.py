"""A real TCP/HTTP load balancer in front of a site's gateways: HAProxy from Debian.

The local control plane's Services have no endpoints (its pods are loopback processes), so
the tests of several gateways per site put HAProxy where kube-proxy or a cloud load
balancer would be. It balances DICOM associations (TCP) and HTTP requests over the
gateways, and takes a gateway out as soon as its `/readyz` stops answering 200, checking
every 200 ms, as a Service drops a pod that is not ready. Like kube-proxy it never retries
elsewhere: a connection refused by a gateway is the sender's failure, so a test sees every
one a gateway causes.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from telerad.devcluster.process import stop_group
from tests.postgres import free_port

INSTALL = "install HAProxy: `make debs` (hack/debs.sh) installs Debian's haproxy"
CHECK_INTERVAL_MS = 200
START_TIMEOUT_S = 10.0


class HAProxyMissing(RuntimeError):
    """The haproxy binary is not installed."""


def _config(dicom_port: int, http_port: int, backends: Sequence[tuple[int, int]]) -> str:
    def servers(which: int) -> str:
        # Each checked on its HTTP port, whichever port it serves.
        return "".join(
            f"  server g{i} 127.0.0.1:{ports[which]} check port {ports[1]}\n"
            for i, ports in enumerate(backends)
        )

    return f"""global
  maxconn 2000
defaults
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  retries 0
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter {CHECK_INTERVAL_MS}ms fall 1 rise 1
frontend dicom
  mode tcp
  bind 127.0.0.1:{dicom_port}
  default_backend dicom
backend dicom
  mode tcp
  balance roundrobin
{servers(0)}frontend http
  mode http
  bind 127.0.0.1:{http_port}
  default_backend http
backend http
  mode http
  balance roundrobin
  # A new connection to the gateway for every request: no reused connection that the
  # gateway may be closing while a request is sent on it.
  option http-server-close
{servers(1)}"""


class HAProxy:
    """HAProxy over gateways given as (DICOM port, HTTP port); `dicom_port` and `url` are
    the site's front door."""

    def __init__(self, workdir: Path, backends: Sequence[tuple[int, int]]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise HAProxyMissing(INSTALL)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(_config(self.dicom_port, self.http_port, backends))
        self.log = workdir / "haproxy.log"
        checked = subprocess.run(
            [binary, "-c", "-f", str(self.config)], capture_output=True, text=True, check=False
        )
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refused its config:\n{checked.stderr}")
        with self.log.open("wb") as log:
            # A group of its own, stopped as one (stop_group) by its own PID.
            self.proc = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"haproxy did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                return True
        except OSError:
            return False

    def settle(self) -> None:
        """Long enough for every gateway's state (ready or not) to reach HAProxy."""
        time.sleep(CHECK_INTERVAL_MS * 3 / 1000)

    def close(self) -> None:
        stop_group(self.proc.pid, timeout=10)
        self.proc.wait()
