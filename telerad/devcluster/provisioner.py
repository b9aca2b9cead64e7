"""A hostPath volume provisioner for the local control plane.

kwok's nodes have no storage, so without a provisioner every pod with a
PersistentVolumeClaim stays Pending. This is the dev cluster's equivalent of kind's
local-path-provisioner: for each claim of a StorageClass whose provisioner is
``telerad.dev/hostpath`` it creates a hostPath PersistentVolume bound to the claim (the
PV controller completes the binding), and deletes released volumes whose reclaim policy
is Delete, with their directories.

    python -m telerad.devcluster.provisioner --server URL --ca CA --cert CRT --key KEY --root DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROVISIONER = "telerad.dev/hostpath"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


class Api:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ctx.load_cert_chain(str(cert), str(key))

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        req = urllib.request.Request(  # noqa: S310
            self.server + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self.ctx) as resp:  # noqa: S310
            return json.loads(resp.read() or b"{}")

    def watch(self, path: str, resource_version: str) -> Any:
        url = (
            f"{self.server}{path}?watch=true&resourceVersion={resource_version}&timeoutSeconds=240"
        )
        return urllib.request.urlopen(url, timeout=300, context=self.ctx)  # noqa: S310


def our_classes(api: Api) -> set[str]:
    items = api.call("GET", "/apis/storage.k8s.io/v1/storageclasses")["items"]
    return {c["metadata"]["name"] for c in items if c.get("provisioner") == PROVISIONER}


def persistent_volume(pvc: Any, root: Path) -> Any:
    meta = pvc["metadata"]
    path = root / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {PROVISIONED_BY: PROVISIONER}},
        "spec": {
            "capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
            "accessModes": pvc["spec"].get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": pvc["spec"]["storageClassName"],
            "volumeMode": pvc["spec"].get("volumeMode", "Filesystem"),
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
        },
    }


def provision(api: Api, pvc: Any, root: Path) -> None:
    if pvc["spec"].get("volumeName") or pvc.get("status", {}).get("phase") != "Pending":
        return
    if pvc["spec"].get("storageClassName") not in our_classes(api):
        return
    pv = persistent_volume(pvc, root)
    Path(pv["spec"]["hostPath"]["path"]).mkdir(parents=True, exist_ok=True)
    try:
        api.call("POST", "/api/v1/persistentvolumes", pv)
    except urllib.error.HTTPError as err:
        if err.code != 409:  # already provisioned on an earlier event
            raise


def watch_claims(api: Api, root: Path) -> None:
    while True:
        try:
            listing = api.call("GET", "/api/v1/persistentvolumeclaims")
            for pvc in listing["items"]:
                provision(api, pvc, root)
            with api.watch(
                "/api/v1/persistentvolumeclaims", listing["metadata"]["resourceVersion"]
            ) as stream:
                for line in stream:
                    event = json.loads(line)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        provision(api, event["object"], root)
        except (urllib.error.URLError, OSError, ValueError) as err:
            print(f"provisioner: watch restarts after {err!r}", flush=True)
            time.sleep(1)


def reclaim(api: Api) -> None:
    while True:
        try:
            for pv in api.call("GET", "/api/v1/persistentvolumes")["items"]:
                released = pv.get("status", {}).get("phase") in ("Released", "Failed")
                ours = pv["metadata"].get("annotations", {}).get(PROVISIONED_BY) == PROVISIONER
                if released and ours and pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete":
                    api.call("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
                    shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)
        except (urllib.error.URLError, OSError, ValueError) as err:
            print(f"provisioner: reclaim pass failed: {err!r}", flush=True)
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    api = Api(args.server, args.ca, args.cert, args.key)
    threading.Thread(target=reclaim, args=(api,), daemon=True).start()
    print(f"provisioner {PROVISIONER} serving, volumes under {args.root}", flush=True)
    watch_claims(api, args.root)


if __name__ == "__main__":
    main()
