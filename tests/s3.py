"""A real S3 server for the object-storage tier's tests: versitygw with its POSIX backend.

`hack/build-s3.sh` builds the binary into the cache beside the control-plane binaries
(`make test` passes its path as TELERAD_S3_BIN; without it the script runs here, a no-op
once built). The server listens on a free loopback port with a root access key and secret
made for the session, and keeps each bucket as a directory under its data directory in
the pytest tmp dir, so a test can look at the bytes at rest.

A watchdog process (`python -m tests.s3 PIDFILE`) waits for pytest's end, whichever way
it comes, and kills the server, whose current PID it reads from PIDFILE (a stop and a start
give it a new one).

Buckets are made through the S3 API with a request signed here (SigV4 in a few lines of
hashlib/hmac): obstore cannot create buckets, and the same signer sends what obstore
cannot (a caller's checksum, a copy with a storage class) in the tests of what the tier
adapter relies on.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tests.processes import ROOT, alive

REGION = "us-east-1"
HEALTH = "/health"
# SigV4 URI encoding: everything but the unreserved characters (RFC 3986).
UNRESERVED = "-_.~"


class S3Missing(RuntimeError):
    """The versitygw binary could not be found or built."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def versitygw_binary() -> Path:
    if env := os.environ.get("TELERAD_S3_BIN"):
        path = Path(env)
    else:
        # Idempotent: prints the path at once when the binary is built.
        done = subprocess.run(
            [ROOT / "hack/build-s3.sh"], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise S3Missing(f"hack/build-s3.sh exited with {done.returncode}:\n{done.stderr}")
        path = Path(done.stdout.strip().splitlines()[-1])
    if not os.access(path, os.X_OK):
        raise S3Missing(f"{path} is not an executable: run hack/build-s3.sh")
    return path


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


class S3Server:
    """One versitygw: `start()`, `stop()` (SIGTERM), `kill()` (SIGKILL), `start()` again on
    the same port and data, `close()` at the end. Its log is versitygw.log in `workdir`,
    its buckets are directories under `workdir/data`."""

    def __init__(self, workdir: Path, binary: Path | None = None) -> None:
        self.binary = binary or versitygw_binary()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir()
        self.log = workdir / "versitygw.log"
        self.port = free_port()
        self.region = REGION
        self.access_key = f"telerad{secrets.token_hex(6)}"
        self.secret_key = secrets.token_urlsafe(30)
        self._pidfile = workdir / "versitygw.pid"
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "tests.s3", str(self._pidfile)],
            stdin=subprocess.PIPE,
            cwd=ROOT,
            # Out of pytest's process group: a Ctrl-C must not end it before pytest ends.
            start_new_session=True,
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None, "versitygw is not running"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30) -> None:
        # The credentials go in the environment, not argv: /proc/PID/cmdline is world-readable.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "ROOT_ACCESS_KEY_ID": self.access_key,
            "ROOT_SECRET_ACCESS_KEY": self.secret_key,
        }
        argv = [
            str(self.binary),
            "--port",
            f"127.0.0.1:{self.port}",
            "--region",
            self.region,
            "--health",
            HEALTH,
            "posix",
            str(self.data_dir),
        ]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._pidfile.write_text(str(self._process.pid))
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"versitygw exited with {self._process.returncode}:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"versitygw did not answer {HEALTH} in {timeout} s:\n{self._tail()}"
                )
            time.sleep(0.05)

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", HEALTH)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def _end(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            process.wait(30)
        self._process = None
        self._pidfile.unlink(missing_ok=True)

    def stop(self) -> None:
        """A clean shutdown: the port refuses connections until the next start()."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash of the server (its POSIX backend does not fsync: no power cut is implied)."""
        self._end(signal.SIGKILL)

    def close(self) -> None:
        try:
            self.kill()
        finally:
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()
            self._watchdog.wait(30)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        timeout: float = 10,
    ) -> Response:
        """One request signed with the root credentials (AWS Signature V4, path style):
        `path` is "/BUCKET/KEY" unencoded; every header given is signed."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        signed = {k.lower(): v.strip() for k, v in (headers or {}).items()}
        signed.setdefault("x-amz-content-sha256", hashlib.sha256(body).hexdigest())
        signed |= {"host": f"127.0.0.1:{self.port}", "x-amz-date": stamp}
        names = sorted(signed)
        uri = quote(path, safe="/" + UNRESERVED)
        params = "&".join(
            f"{quote(k, safe=UNRESERVED)}={quote(v, safe=UNRESERVED)}"
            for k, v in sorted((query or {}).items())
        )
        canonical = "\n".join(
            [
                method,
                uri,
                params,
                "".join(f"{n}:{signed[n]}\n" for n in names),
                ";".join(names),
                signed["x-amz-content-sha256"],
            ]
        )
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = f"AWS4{self.secret_key}".encode()
        for part in (stamp[:8], self.region, "s3", "aws4_request"):
            key = hmac.digest(key, part.encode(), "sha256")
        signature = hmac.new(key, to_sign.encode(), "sha256").hexdigest()
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, uri + (f"?{params}" if params else ""), body=body, headers=signed)
            answer = conn.getresponse()
            return Response(
                answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
            )
        finally:
            conn.close()

    def create_bucket(self, name: str) -> None:
        answer = self.request("PUT", f"/{name}")
        if answer.status != 200:
            raise RuntimeError(f"CreateBucket {name}: {answer.status} {answer.body!r}")


def watch(pidfile: Path) -> None:
    """Wait for the end of stdin (pytest closed it or died), then kill the server whose
    PID is in `pidfile`, if one runs."""
    sys.stdin.buffer.read()
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    watch(Path(sys.argv[1]))
