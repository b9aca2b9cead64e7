"""Run a pod's process here, in the pod's place.

The dev cluster has no kubelet and no container runtime: kwok marks pods Running and gives
them loopback addresses. This module does the rest of a kubelet's work for one container
of such a pod: it writes the pod's ConfigMap, Secret and projected volumes under a local
root, makes its emptyDir and claim mounts as directories, and rewrites the container's
config file so that every path in it points under that root and the process listens on
the pod's own address. The process then starts from exactly what the operator rendered,
and is reached the way the pod would be (by the operator's autoscaler, by Prometheus).

`confine` does a container runtime's part of the pod's security context, when this runs as
root: the process runs as the pod's user and group, without capabilities or new
privileges, in a mount namespace whose root file system is read-only and where only the
pod's writable volumes can be written. So a process that needs root, or writes outside
its volumes, fails here as it would in the cluster.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import shlex
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

Body = dict[str, Any]
Read = Callable[[str, str], Body | None]
"""(kind, name) -> the object from the API server, or None when it does not exist."""


_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


class StandInError(Exception):
    pass


def _files(source: Body, kind: str, read: Read) -> dict[str, bytes]:
    name = source.get("name") or source.get("secretName", "")
    obj = read(kind, name)
    if obj is None:
        if source.get("optional"):
            return {}
        raise StandInError(f"{kind} {name!r} that the pod mounts does not exist")
    data = (
        {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        if kind == "ConfigMap"
        else {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    )
    if kind == "ConfigMap":
        data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    items = source.get("items")
    if not items:
        return data
    return {i["path"]: data[i["key"]] for i in items if i["key"] in data}


def _volume_files(volume: Body, read: Read) -> dict[str, bytes] | None:
    """Files of a volume by relative path; None for a directory volume (emptyDir, claim)."""
    if "configMap" in volume:
        return _files(volume["configMap"], "ConfigMap", read)
    if "secret" in volume:
        return _files(volume["secret"], "Secret", read)
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources", []):
            for key, kind in (("configMap", "ConfigMap"), ("secret", "Secret")):
                if key in source:
                    files |= _files(source[key], kind, read)
        return files
    if "emptyDir" in volume or "persistentVolumeClaim" in volume:
        return None
    raise StandInError(
        f"volume {volume['name']!r}: only configMap, secret, projected, "
        "emptyDir and persistentVolumeClaim volumes can stand in here"
    )


def current_pod(pods: list[Body], deployment: Body) -> Body | None:
    """A pod that has its address and runs the Deployment's current template (the
    template's annotations, its config hash among them): the one to stand in for."""
    want = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    for pod in pods:
        have = pod["metadata"].get("annotations") or {}
        if (pod.get("status") or {}).get("podIP") and want.items() <= have.items():
            return pod
    return None


def local(path: str, root: Path) -> Path:
    return root / PurePosixPath(path).relative_to("/")


def materialize(pod: Body, container: str, read: Read, root: Path) -> list[str]:
    """Write the volumes `container` mounts under `root`; return their mount paths."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    mounts = []
    for mount in spec.get("volumeMounts", []):
        target = local(mount["mountPath"], root)
        target.mkdir(parents=True, exist_ok=True)
        files = _volume_files(volumes[mount["name"]], read)
        for relative, content in (files or {}).items():
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o600)
        mounts.append(mount["mountPath"])
    return mounts


def _moved(value: Any, mounts: list[str], root: Path, hosts: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _moved(v, mounts, root, hosts) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, mounts, root, hosts) for v in value]
    if isinstance(value, str) and any(
        value == m or value.startswith(m.rstrip("/") + "/") for m in mounts
    ):
        return str(local(value, root))
    if isinstance(value, str):
        for name, address in hosts.items():
            value = value.replace(f"//{name}:", f"//{address}:")
    return value


def prepare(
    pod: Body, container: str, read: Read, root: Path, hosts: Mapping[str, str] | None = None
) -> list[str]:
    """The command line that runs `container` of `pod` here: its volumes written under
    `root`, and its `--config` file rewritten to those paths, the pod's address, and the
    addresses `hosts` gives Service names in URLs (the cluster DNS this machine lacks)."""
    mounts = materialize(pod, container, read, root)
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    args = list(spec.get("args", []))
    if "--config" not in args:
        raise StandInError(f"container {container!r} has no --config argument")
    at = args.index("--config") + 1
    config_path = local(args[at], root)
    config = yaml.safe_load(config_path.read_text())
    config = _moved(config, mounts, root, hosts or {})
    config["bindAddress"] = pod["status"]["podIP"]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    args[at] = str(config_path)
    return args


def check_ports(pod: Body, container: str, proc: Path = Path("/proc")) -> None:
    """Refuse, naming the port and the process, to stand in for a pod whose ports are
    taken. The pod's process shares this machine's network and binds only the pod's own
    address, so a host process on 127.0.0.1 does not stand in its way; but one listening
    on every address (0.0.0.0 or ::, as Prometheus does on 9090) holds that port on the
    pod's address too, and only a network namespace of its own would avoid that."""
    address = pod["status"]["podIP"]
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    for port in spec.get("ports", []):
        if port.get("protocol", "TCP") != "TCP":
            continue
        number = int(port["containerPort"])
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As the pod's servers bind: a connection in TIME_WAIT is no obstacle.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, number))
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
                name = pod["metadata"]["name"]
                raise StandInError(
                    f"port {number} of pod {name} ({address}:{number}) is taken on this "
                    f"machine by {_listener(address, number, proc)}; a listener on every "
                    f"address holds the port on the pod's address too: stop it, or bind it "
                    f"to 127.0.0.1 only"
                ) from None


def _listener(address: str, port: int, proc: Path) -> str:
    """Which process listens on `port` of `address` or of every address, from /proc."""
    wildcards = {"0.0.0.0", "::"}  # noqa: S104  (what is looked for, not bound)
    inodes: dict[str, str] = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            for line in (proc / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                host, _, hex_port = local.partition(":")
                if state != _LISTEN or int(hex_port, 16) != port:
                    continue
                raw = bytes.fromhex(host)
                # The kernel prints each 32-bit word of the address in host byte order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                shown = socket.inet_ntop(family, words)
                if shown in wildcards or shown == address:
                    inodes[f"socket:[{inode}]"] = shown
    for fd_dir in proc.glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target in inodes:
                        pid = fd_dir.parent.name
                        command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                        return (
                            f"process {pid} ({command.decode(errors='replace').strip()}), "
                            f"listening on {inodes[target]}:{port}"
                        )
    return "a process this user cannot see"


@dataclass(frozen=True)
class Confinement:
    """How to run a container's process as its runtime would: prefix its command line with
    `prefix` and add `env` to its environment."""

    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _blocked(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first directory on the way to `path` that `uid` (with `gids`) cannot walk
    through; None when it can reach it."""
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in gids:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return directory
    return None


def _reveal(hidden: list[tuple[Path, Path, Path]]) -> list[str]:
    """Shell steps that let the user reach each `path` behind its private directory
    `blocked` (a Python under /root, say), given as (path, blocked, staging), as it would
    in an image: every `path` is bound aside to its `staging` first; each `blocked` is then
    covered, once, by a small read-only tmpfs holding only the way to its paths, with the
    paths moved back in."""
    q = shlex.quote
    covers = sorted({blocked for _, blocked, _ in hidden})
    return [
        *(f"mount --bind {q(str(path))} {q(str(staging))}" for path, _, staging in hidden),
        *(f"mount -t tmpfs -o mode=0755,size=64k tmpfs {q(str(b))}" for b in covers),
        *(f"mkdir -p {q(str(path))}" for path, _, _ in hidden),
        *(f"mount --move {q(str(staging))} {q(str(path))}" for path, _, staging in hidden),
        *(f"mount -o remount,ro {q(str(b))}" for b in covers),
    ]


def _volumes(spec: Body, root: Path) -> tuple[list[str], dict[str, str]]:
    """Shell steps that mount each volume of a container where it is written, read-only
    where the pod says so; and the environment that points temporary files at its /tmp."""
    script, env = [], {}
    for mount in spec.get("volumeMounts", []):
        path = shlex.quote(str(local(mount["mountPath"], root)))
        script.append(f"mount --bind {path} {path}")
        if mount.get("readOnly"):
            script.append(f"mount -o remount,bind,ro {path}")
        elif mount["mountPath"] == "/tmp":  # noqa: S108  (the pod's own /tmp, an emptyDir)
            env["TMPDIR"] = str(local(mount["mountPath"], root))
    return script, env


def confine(pod: Body, container: str, root: Path, software: list[Path]) -> Confinement:
    """The confinement of `container` of `pod`, whose volumes `prepare` wrote under `root`;
    `software` are the directories its image would hold (the program, its interpreter).
    Needs root (a mount namespace, a change of user): StandInError says why it cannot be
    done."""
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    pod_context = pod["spec"].get("securityContext") or {}
    context = {**pod_context, **(spec.get("securityContext") or {})}
    uid = context.get("runAsUser")
    if uid is None:
        raise StandInError(f"container {container!r} names no runAsUser to run as")
    if context.get("runAsNonRoot") and uid == 0:
        raise StandInError(f"container {container!r} runs as root but asks runAsNonRoot")
    gid = context.get("runAsGroup", uid)
    fs_group = pod_context.get("fsGroup")
    groups = {gid} | ({fs_group} if fs_group is not None else set())
    if os.geteuid() != 0:
        raise StandInError("confining a process needs root (a mount namespace, setpriv)")
    if _blocked(root, uid, groups) is not None:
        raise StandInError(f"user {uid} cannot reach the pod's volumes in {root}")
    # The kubelet gives the pod's volumes to its fsGroup; here the user simply owns them.
    for directory, _, names in os.walk(root):
        for name in [directory, *(os.path.join(directory, n) for n in names)]:
            os.chown(name, uid, fs_group if fs_group is not None else gid)

    hidden = []
    for index, path in enumerate(software):
        blocked = _blocked(path, uid, groups)
        if blocked is not None:
            staging = root / f".image-{index}"
            staging.mkdir(exist_ok=True)
            hidden.append((path, blocked, staging))
    volumes, env = _volumes(spec, root)
    script = _reveal(hidden) + volumes
    if context.get("readOnlyRootFilesystem"):
        script.append("mount -o remount,bind,ro /")
    drop = context.get("capabilities", {}).get("drop", [])
    privileges = ["--bounding-set=-all", "--inh-caps=-all"] if "ALL" in drop else []
    if context.get("allowPrivilegeEscalation") is False:
        privileges.append("--no-new-privs")
    supplementary = ",".join(str(g) for g in sorted(groups))
    prefix = [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-ec", "; ".join([*script, 'exec "$@"']), "confine",
        "setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={supplementary}",
        *privileges, "--",
    ]  # fmt: skip
    return Confinement(prefix, env)


def confined_as(pid: int) -> tuple[int, bool]:
    """(effective user, whether its root file system is read-only) of a running process,
    from /proc: what the confinement of it really is."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[2])
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            return uid, "ro" in fields[5].split(",")
    return uid, False
