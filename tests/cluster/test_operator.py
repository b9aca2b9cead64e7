"""The operator on the real control plane, running as in production: its own process,
its ServiceAccount's RBAC, kwok nodes with and without GPUs."""

from __future__ import annotations

import base64
import copy
import datetime
import json
import threading
import time
from typing import Any

import httpx2 as httpx
import pytest
from cryptography import x509
from lightkube.resources.core_v1 import Pod

from telerad.devcluster.pki import CertificateAuthority
from tests.api_examples import SAMPLES as SAMPLES_DIR
from tests.api_examples import samples
from tests.cluster.conftest import Cluster, Operator
from tests.cluster.test_controlplane import eventually

SAMPLES = samples()
SITES = ("st-marys", "riverside-imaging")
MODELS = ("ct-head-hyperdensity", "chest-xray-triage")
IMAGE_PATH = "/spec/template/spec/containers/0/image"
GRANT = SAMPLES_DIR / "operator-secrets.yaml"
OPERATOR_SA = "system:serviceaccount:telerad-system:telerad-operator"


TLS_SECRET = "st-marys-dicom-tls"  # noqa: S105  (a Secret's name)
_CA = CertificateAuthority("telerad-test-ca")


def put_tls_secret(cluster: Cluster, ns: str, **validity: Any) -> datetime.datetime:
    """Create or replace st-marys' TLS Secret with a certificate issued with `validity`
    (CertificateAuthority.issue's); returns when it expires."""
    cert, key = _CA.issue("st-marys-gateway", server=True, **validity)
    data = {"tls.crt": cert, "tls.key": key, "ca.crt": _CA.cert_pem}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": TLS_SECRET},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }
    cluster.kubectl(
        "-n", ns, "apply", "--server-side", "--force-conflicts", "-f", "-",
        input=json.dumps(secret),
    )  # fmt: skip
    return x509.load_pem_x509_certificate(cert).not_valid_after_utc


def apply_samples(
    cluster: Cluster, ns: str, *, tls_secret: bool = True, grant: bool = True
) -> None:
    if grant:  # the sample namespace's grant: the operator may read its TLS Secret
        cluster.kubectl("-n", ns, "apply", "--server-side", "-f", str(GRANT))
    if tls_secret:  # a placeholder: kwok runs no gateway (Degraded CertificateInvalid only)
        cluster.kubectl(
            "-n", ns, "create", "secret", "generic", TLS_SECRET,
            "--from-literal=tls.crt=-", "--from-literal=tls.key=-", "--from-literal=ca.crt=-",
        )  # fmt: skip
    for example in SAMPLES:
        cluster.kubectl("-n", ns, "apply", "--server-side", "-f", str(example.path))


def wait_ready(cluster: Cluster, ns: str) -> None:
    for kind in ("imagingsite", "aimodel"):
        proc = cluster.kubectl(
            "-n", ns, "wait", "--for=condition=Ready", kind, "--all", "--timeout=90s", check=False
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    proc = cluster.kubectl(
        "-n", ns, "wait", "--for=condition=Accepted", "routingpolicy", "--all", "--timeout=60s",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def get(cluster: Cluster, ns: str, kind: str, name: str) -> Any:
    return cluster.kubectl_json("-n", ns, "get", kind, name)


def snapshot(cluster: Cluster, ns: str) -> dict[str, tuple[str, str]]:
    """uid and resourceVersion of every child and custom resource in the namespace."""
    items = cluster.kubectl_json(
        "-n", ns, "get", "deploy,svc,cm,pvc,netpol,sa,imagingsite,aimodel,routingpolicy"
    )["items"]  # fmt: skip
    return {
        f"{i['kind']}/{i['metadata']['name']}": (
            i["metadata"]["uid"],
            i["metadata"]["resourceVersion"],
        )
        for i in items
        if i["metadata"]["name"] not in ("default", "kube-root-ca.crt")
    }


def settle(op: Operator, seconds: float | None = None) -> None:
    """Wait past at least one full resync."""
    time.sleep(seconds if seconds is not None else op.resync_seconds * 2 + 1)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_samples_become_ready_on_the_right_nodes(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    pods = cluster.kubectl_json("-n", namespace, "get", "pods")["items"]
    placement = {p["metadata"]["labels"]["app.kubernetes.io/component"]: set() for p in pods}
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        placement[pod["metadata"]["labels"]["app.kubernetes.io/component"]].add(
            pod["spec"]["nodeName"][:3]
        )
    assert placement == {"gateway": {"cpu"}, "worker": {"gpu"}}
    site = get(cluster, namespace, "imagingsite", "st-marys")
    assert site["status"]["observedGeneration"] == site["metadata"]["generation"]
    assert site["status"]["endpoint"] == f"TELERAD_STM@st-marys-gateway.{namespace}.svc:11112"
    assert site["status"]["tiers"] == [
        {"name": "hot", "location": "volume"},
        {"name": "warm", "location": "volume"},
    ]
    worker = get(cluster, namespace, "deployment", "ct-head-hyperdensity-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    gateway = get(cluster, namespace, "deployment", "st-marys-gateway")
    pod_spec = gateway["spec"]["template"]["spec"]
    assert gateway["spec"]["strategy"]["type"] == "Recreate"
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    config = get(cluster, namespace, "configmap", "st-marys-gateway")["data"]["gateway.yaml"]
    assert "ed-head-ct" in config
    assert "ct-head-hyperdensity" in config
    assert (
        'telerad_operator_reconcile_total{kind="ImagingSite",result="done"}' in operator.metrics()
    )


def test_a_site_with_bucket_tiers_shows_their_region_and_has_no_volume_for_them(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    site = {
        "apiVersion": "telerad.io/v1alpha1",
        "kind": "ImagingSite",
        "metadata": {"name": "lakeside"},
        "spec": {
            "aeTitle": "LAKESIDE",
            "allowedCallers": [{"aeTitle": "CT01"}],
            "storage": {
                "hot": {"size": "10Gi"},
                "warm": {
                    "days": 60,
                    "objectStore": {
                        "bucket": "lakeside-images",
                        "prefix": "warm",
                        "region": "eu-central-1",
                        "storageClass": "STANDARD_IA",
                        "credentialsSecretRef": {"name": "lakeside-s3"},
                    },
                },
                "cold": {
                    "objectStore": {
                        "bucket": "lakeside-archive",
                        "region": "eu-central-1",
                        "storageClass": "DEEP_ARCHIVE",
                    }
                },
                "retentionDays": 3650,
            },
        },
    }
    cluster.kubectl("-n", namespace, "apply", "--server-side", "-f", "-", input=json.dumps(site))
    eventually(
        lambda: (
            len(
                (get(cluster, namespace, "imagingsite", "lakeside").get("status") or {}).get(
                    "tiers", []
                )
            )
            == 3
        ),
        "the tiers in the site's status",
    )
    status = get(cluster, namespace, "imagingsite", "lakeside")["status"]
    assert {t["name"]: t.get("region") for t in status["tiers"]} == {
        "hot": None,
        "warm": "eu-central-1",
        "cold": "eu-central-1",
    }
    assert status["tiers"][2]["location"] == "s3://lakeside-archive"
    claims = cluster.kubectl_json("-n", namespace, "get", "pvc")["items"]
    assert [c["metadata"]["name"] for c in claims] == ["lakeside-gateway-hot"]
    config = get(cluster, namespace, "configmap", "lakeside-gateway")["data"]["gateway.yaml"]
    assert "credentialsDir: /var/run/telerad/s3/warm" in config


def test_change_touches_only_affected_children_and_resync_writes_nothing(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    settle(operator)
    quiet_from = now()
    settle(operator)
    assert operator.writes_in(namespace, quiet_from) == []

    before = snapshot(cluster, namespace)
    site = get(cluster, namespace, "imagingsite", "riverside-imaging")
    cluster.kubectl(
        "-n", namespace, "patch", "imagingsite", "riverside-imaging", "--type=merge",
        "-p", json.dumps({"spec": {"completion": {"quietSeconds": 45}}}),
    )  # fmt: skip
    generation = site["metadata"]["generation"] + 1
    eventually(
        lambda: (
            get(cluster, namespace, "imagingsite", "riverside-imaging")["status"][
                "observedGeneration"
            ]
            == generation
        ),
        "observedGeneration to advance",
    )
    settle(operator)
    after = snapshot(cluster, namespace)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {
        "ImagingSite/riverside-imaging",
        "ConfigMap/riverside-imaging-gateway",
        "Deployment/riverside-imaging-gateway",
    }
    config = get(cluster, namespace, "configmap", "riverside-imaging-gateway")["data"][
        "gateway.yaml"
    ]
    assert "quietSeconds: 45" in config


def test_drift_is_undone(cluster: Cluster, operator: Operator, namespace: str) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    service_uid = get(cluster, namespace, "service", "st-marys-gateway")["metadata"]["uid"]
    cluster.kubectl(
        "-n", namespace, "patch", "deployment", "st-marys-gateway", "--type=json",
        "-p", json.dumps([{"op": "replace", "path": IMAGE_PATH, "value": "evil:1"}]),
    )  # fmt: skip
    cluster.kubectl("-n", namespace, "delete", "service", "st-marys-gateway")
    cluster.kubectl("-n", namespace, "delete", "configmap", "st-marys-gateway")

    def restored() -> bool:
        image = get(cluster, namespace, "deployment", "st-marys-gateway")["spec"]["template"][
            "spec"
        ]["containers"][0]["image"]
        svc = cluster.kubectl(
            "-n", namespace, "get", "service", "st-marys-gateway", "-o", "json", check=False
        )
        cm = cluster.kubectl("-n", namespace, "get", "configmap", "st-marys-gateway", check=False)
        return (
            image != "evil:1"
            and svc.returncode == 0
            and json.loads(svc.stdout)["metadata"]["uid"] != service_uid
            and cm.returncode == 0
        )

    eventually(restored, "the operator to undo the edits", timeout=30)


def test_policy_refused_until_the_model_is_fixed(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    policy = {
        "apiVersion": "telerad.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "brain-mr"},
        "spec": {
            "sites": {"names": ["st-marys"]},
            "rules": [
                {
                    "name": "brain",
                    "match": {"modalities": ["MR"]},
                    "models": ["mr-brain"],
                    "priority": "urgent",
                }
            ],
        },
    }
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(policy))

    def condition(type_: str) -> dict[str, Any] | None:
        status = get(cluster, namespace, "routingpolicy", "brain-mr").get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == type_), None)

    eventually(
        lambda: condition("ResolvedRefs") and condition("ResolvedRefs")["status"] == "False",
        "refusal",
    )
    message = condition("Accepted")["message"]
    assert condition("Accepted")["status"] == "False"
    assert "'brain'" in message
    assert "'mr-brain'" in message
    assert "does not exist" in message

    model = copy.deepcopy(
        next(e.obj for e in SAMPLES if e.obj["metadata"]["name"] == "ct-head-hyperdensity")
    )
    model["metadata"]["name"] = "mr-brain"
    cluster.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(model))
    eventually(
        lambda: (
            condition("ResolvedRefs")["status"] == "True"
            and "intended" in condition("Accepted")["message"]
        ),
        "the model to resolve but not cover MR",
    )
    assert condition("Accepted")["status"] == "False"
    assert "sends modality MR to AIModel 'mr-brain'" in condition("Accepted")["message"]

    generation = get(cluster, namespace, "routingpolicy", "brain-mr")["metadata"]["generation"]
    cluster.kubectl(
        "-n", namespace, "patch", "aimodel", "mr-brain", "--type=merge",
        "-p", json.dumps({"spec": {"intendedUse": {"modalities": ["MR"], "bodyParts": []}}}),
    )  # fmt: skip
    eventually(lambda: condition("Accepted")["status"] == "True", "the policy to be accepted")
    assert (
        get(cluster, namespace, "routingpolicy", "brain-mr")["metadata"]["generation"] == generation
    )


@pytest.mark.reliability("attack", "one tenant's objects read with another's role")
def test_tenants_see_nothing_of_each_other(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    other = f"{namespace[:50]}-b"
    cluster.kubectl("create", "namespace", other)
    try:
        for ns in (namespace, other):
            apply_samples(cluster, ns)
        for ns in (namespace, other):
            wait_ready(cluster, ns)
        # A policy in B naming a site that only exists in A selects nothing.
        cluster.kubectl("-n", other, "delete", "imagingsite", "st-marys")
        eventually(
            lambda: (
                get(cluster, other, "routingpolicy", "default-routing")["status"]["sites"]
                == ["riverside-imaging"]
            ),
            "B's policy to drop the deleted site",
        )
        for ns in (namespace, other):
            elsewhere = other if ns == namespace else namespace
            for model in MODELS:
                config = get(cluster, ns, "configmap", f"{model}-worker")["data"]["worker.yaml"]
                assert f".{ns}.svc" in config
                assert f".{elsewhere}.svc" not in config
            for child in cluster.kubectl_json("-n", ns, "get", "deploy,svc,cm,netpol")["items"]:
                for ref in child["metadata"].get("ownerReferences", []):
                    owner_kind = ref["kind"].lower()
                    owner = get(cluster, ns, owner_kind, ref["name"])
                    assert owner["metadata"]["uid"] == ref["uid"]
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false")


@pytest.mark.reliability("fault", "restart of the operator")
def test_restart_recreates_nothing_and_flips_no_condition(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    settle(operator)
    before = snapshot(cluster, namespace)
    conditions = {
        name: get(cluster, namespace, "imagingsite", name)["status"]["conditions"] for name in SITES
    }
    operator.stop()
    restarted = now()
    operator.start()
    settle(operator)
    assert snapshot(cluster, namespace) == before
    for name in SITES:
        assert (
            get(cluster, namespace, "imagingsite", name)["status"]["conditions"] == conditions[name]
        )
    assert operator.writes_in(namespace, restarted) == []


@pytest.mark.reliability("fault", "kube-apiserver killed (-9) and down 5 s while the operator runs")
@pytest.mark.reliability("fault", "etcd killed (-9) and down 5 s while the operator runs")
@pytest.mark.timeout(300)
def test_the_operator_rides_out_an_api_server_and_an_etcd_crash(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """After each crash the operator, still the same process, picks up a change made once
    the API is back, recreates nothing, and every object stays Ready."""
    if cluster.plane is None:
        pytest.skip("crashing components needs the local control plane")
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    settle(operator)
    before = snapshot(cluster, namespace)
    crashed = now()
    for quiet, component in enumerate(("kube-apiserver", "etcd"), start=41):
        cluster.plane.restart(component, down=5)
        cluster.kubectl(
            "-n", namespace, "patch", "imagingsite", "riverside-imaging", "--type=merge",
            "-p", json.dumps({"spec": {"completion": {"quietSeconds": quiet}}}),
        )  # fmt: skip
        eventually(
            lambda q=quiet: (
                f"quietSeconds: {q}"  # type: ignore[misc]
                in get(cluster, namespace, "configmap", "riverside-imaging-gateway")["data"][
                    "gateway.yaml"
                ]
            ),
            f"the change after the {component} crash to reach the gateway's ConfigMap",
            timeout=90,
        )
    assert operator.proc is not None and operator.proc.poll() is None, operator.tail()
    wait_ready(cluster, namespace)
    after = snapshot(cluster, namespace)
    assert after.keys() == before.keys()
    assert all(after[k][0] == before[k][0] for k in before), "an object was recreated"
    # Events are created, as ever; nothing else is.
    writes = operator.writes_in(namespace, crashed)
    created = [ref for verb, ref in writes if verb == "create" and ref["resource"] != "events"]
    assert created == []
    assert {verb for verb, _ in writes} <= {"create", "patch"}


@pytest.mark.reliability("fault", "kill -9 of the operator in the middle of a reconcile")
def test_kill_9_mid_reconcile_converges_without_duplicates(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """Killed once it has written some of the samples' children and not all, the restarted
    operator finishes the job: every child exists once, owned by its object, and nothing
    it had written is deleted or recreated."""
    children = "deploy,svc,cm,pvc,netpol,sa"

    def written() -> list[Any]:
        items = cluster.kubectl_json("-n", namespace, "get", children)["items"]
        return [i for i in items if i["metadata"].get("ownerReferences")]

    apply_samples(cluster, namespace)
    with cluster.http() as http:  # kill at its first ConfigMap, polled as fast as it goes
        deadline = time.monotonic() + 30
        while not any(
            i["metadata"].get("ownerReferences")
            for i in http.get(f"/api/v1/namespaces/{namespace}/configmaps").json()["items"]
        ):
            assert time.monotonic() < deadline, operator.tail()
    operator.kill()
    before = {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["uid"] for i in written()}
    restarted = now()
    operator.start()
    wait_ready(cluster, namespace)
    settle(operator)
    after = written()
    names = [f"{i['kind']}/{i['metadata']['name']}" for i in after]
    assert len(names) == len(set(names))
    assert len(after) > len(before), "the kill must land before every child was written"
    uids = {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["uid"] for i in after}
    assert all(uids[name] == uid for name, uid in before.items()), "a child was recreated"
    assert "delete" not in {verb for verb, _ in operator.writes_in(namespace, restarted)}


def test_deletion_leaves_no_orphans(cluster: Cluster, operator: Operator, namespace: str) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    # st-marys retains its volumes (the default); riverside-imaging deletes them.
    for site in SITES:
        cluster.kubectl("-n", namespace, "delete", "imagingsite", site)
    cluster.kubectl("-n", namespace, "delete", "aimodel", "--all")

    def leftovers() -> list[str]:
        items = cluster.kubectl_json("-n", namespace, "get", "deploy,rs,pods,svc,cm,netpol,sa,pvc")[
            "items"
        ]
        return sorted(
            f"{i['kind']}/{i['metadata']['name']}"
            for i in items
            if i["metadata"]["name"] not in ("default", "kube-root-ca.crt")
        )

    expected = [
        "PersistentVolumeClaim/st-marys-gateway-hot",
        "PersistentVolumeClaim/st-marys-gateway-warm",
    ]
    eventually(
        lambda: leftovers() == expected,
        "garbage collection to leave only retained volumes",
        timeout=60,
    )
    for name in ("st-marys-gateway-hot", "st-marys-gateway-warm"):
        assert not get(cluster, namespace, "pvc", name)["metadata"].get("ownerReferences")


def test_pause_stops_reconciliation_until_removed(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    cluster.kubectl(
        "-n", namespace, "annotate", "imagingsite", "riverside-imaging", "telerad.io/paused=true"
    )

    def paused() -> str | None:
        status = get(cluster, namespace, "imagingsite", "riverside-imaging")["status"]
        return next((c["status"] for c in status["conditions"] if c["type"] == "Paused"), None)

    eventually(lambda: paused() == "True", "the Paused condition")
    cluster.kubectl("-n", namespace, "delete", "service", "riverside-imaging-gateway")
    settle(operator)
    assert (
        cluster.kubectl(
            "-n", namespace, "get", "service", "riverside-imaging-gateway", check=False
        ).returncode
        != 0
    )
    cluster.kubectl(
        "-n", namespace, "annotate", "imagingsite", "riverside-imaging", "telerad.io/paused-"
    )
    eventually(
        lambda: (
            cluster.kubectl(
                "-n", namespace, "get", "service", "riverside-imaging-gateway", check=False
            ).returncode
            == 0
        ),
        "the Service to come back after the pause",
    )
    assert paused() == "False"


def test_missing_tls_secret_degrades_until_created(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    apply_samples(cluster, namespace, tls_secret=False)

    def conditions() -> dict[str, Any]:
        status = get(cluster, namespace, "imagingsite", "st-marys").get("status") or {}
        return {c["type"]: c for c in status.get("conditions", [])}

    eventually(lambda: conditions().get("Degraded", {}).get("status") == "True", "Degraded")
    assert "st-marys-dicom-tls" in conditions()["Degraded"]["message"]
    assert conditions()["Ready"]["status"] == "False"
    events = cluster.kubectl_json(
        "-n", namespace, "get", "events", "--field-selector", "involvedObject.name=st-marys"
    )
    assert any(e["reason"] == "MissingSecret" for e in events["items"])
    put_tls_secret(cluster, namespace)
    eventually(
        lambda: conditions()["Ready"]["status"] == "True",
        "Ready once the Secret exists",
        timeout=30,
    )
    assert conditions()["Degraded"]["status"] == "False"


def test_a_site_certificate_near_or_past_expiry_degrades_the_site(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """Expiring within 14 days: Degraded, still Ready (it is served and trusted). Expired:
    Degraded and not Ready (peers refuse it). Renewed: neither. Events and conditions give
    the Secret's name and the date, nothing else."""
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)

    def conditions() -> dict[str, Any]:
        status = get(cluster, namespace, "imagingsite", "st-marys").get("status") or {}
        return {c["type"]: c for c in status.get("conditions", [])}

    # The placeholder: no certificate at all (a real gateway would not start with it).
    eventually(
        lambda: conditions()["Degraded"]["reason"] == "CertificateInvalid", "CertificateInvalid"
    )
    assert "tls.crt holds no PEM certificate" in conditions()["Degraded"]["message"]
    expires = put_tls_secret(cluster, namespace, valid_for=datetime.timedelta(days=3))
    eventually(
        lambda: conditions()["Degraded"]["reason"] == "CertificateExpiring", "CertificateExpiring"
    )
    degraded = conditions()["Degraded"]
    assert degraded["status"] == "True"
    expected = f"{TLS_SECRET!r}: the certificate expires on {expires:%Y-%m-%d %H:%M} UTC"
    assert expected in degraded["message"]
    assert conditions()["Ready"]["status"] == "True"
    events = cluster.kubectl_json(
        "-n", namespace, "get", "events", "--field-selector", "involvedObject.name=st-marys"
    )
    assert any(e["reason"] == "CertificateExpiring" for e in events["items"])

    put_tls_secret(cluster, namespace, expired=True)
    eventually(
        lambda: conditions()["Degraded"]["reason"] == "CertificateExpired", "CertificateExpired"
    )
    assert "the certificate expired on" in conditions()["Degraded"]["message"]
    assert conditions()["Ready"]["status"] == "False"

    put_tls_secret(cluster, namespace)
    eventually(lambda: conditions()["Ready"]["status"] == "True", "Ready once renewed")
    assert conditions()["Degraded"]["status"] == "False"


def test_kubectl_scale_sets_worker_replicas(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)
    cluster.kubectl("-n", namespace, "scale", "aimodel/chest-xray-triage", "--replicas=3")
    eventually(
        lambda: (
            get(cluster, namespace, "deployment", "chest-xray-triage-worker")["status"].get(
                "readyReplicas"
            )
            == 3
        ),
        "three workers",
    )
    eventually(
        lambda: (
            get(cluster, namespace, "aimodel", "chest-xray-triage")["status"].get("readyReplicas")
            == 3
        ),
        "status to report them",
    )
    assert (
        get(cluster, namespace, "aimodel", "chest-xray-triage")["status"]["scalingReason"]
        == "fixed by spec.replicas"
    )


def can(cluster: Cluster, *args: str) -> bool:
    """Whether the operator's ServiceAccount may (the API server's own answer)."""
    proc = cluster.kubectl("auth", "can-i", *args, f"--as={OPERATOR_SA}", check=False)
    return proc.stdout.strip() == "yes"


@pytest.mark.reliability("attack", "operator RBAC: writes to Secrets, cluster roles, pods")
@pytest.mark.parametrize("verb", ["create", "update", "deletecollection"])
def test_operator_service_account_is_least_privilege(
    cluster: Cluster, operator: Operator, verb: str
) -> None:
    assert can(cluster, "patch", "deployments", "-n", "any")
    assert not can(cluster, verb, "secrets", "-n", "any")
    assert not can(cluster, verb, "clusterroles")
    assert not can(cluster, "create", "pods", "-n", "any")


def test_the_operator_starts_without_forbidden_resource_scans(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """kopf watches CRDs to notice kinds installed after it started; as its ServiceAccount
    it used to get 403 on every start (nine retries, then "escalating")."""
    # This start's log only: other tests restart the API server, which answers 403 while
    # its authorizer comes up.
    operator.stop()
    started_at = operator.log.stat().st_size
    operator.start()
    apply_samples(cluster, namespace)
    wait_ready(cluster, namespace)  # up and serving: its startup scans are behind it
    assert can(cluster, "watch", "customresourcedefinitions")
    assert not can(cluster, "patch", "customresourcedefinitions")
    with operator.log.open("rb") as log:
        log.seek(started_at)
        lines = log.read().decode(errors="replace").splitlines()
    scans = [
        line
        for line in lines
        if "customresourcedefinitions" in line
        and ("403" in line or "Forbidden" in line or "escalating" in line)
    ]
    assert scans == []


@pytest.mark.reliability(
    "attack", "operator RBAC: reading Secrets not granted by name (other names, list, watch)"
)
def test_the_operator_reads_only_the_secrets_a_namespace_grants_by_name(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """Without the namespace's grant, st-marys says which Secret to grant and the operator
    reads nothing; with it, the operator may get that one Secret and no other."""
    apply_samples(cluster, namespace, grant=False)
    tls_name = "st-marys-dicom-tls"
    for where in (namespace, "kube-system", "telerad-system"):
        assert not can(cluster, "get", "secrets", "-n", where)
        assert not can(cluster, "list", "secrets", "-n", where)
        assert not can(cluster, "watch", "secrets", "-n", where)
    assert not can(cluster, "get", f"secret/{tls_name}", "-n", namespace)

    def degraded() -> dict[str, Any]:
        status = get(cluster, namespace, "imagingsite", "st-marys").get("status") or {}
        return {c["type"]: c for c in status.get("conditions", [])}.get("Degraded", {})

    eventually(lambda: degraded().get("reason") == "SecretNotGranted", "SecretNotGranted")
    assert tls_name in degraded()["message"]
    assert "operator-secrets.yaml" in degraded()["message"]

    put_tls_secret(cluster, namespace)  # a real one: the placeholder is CertificateInvalid
    cluster.kubectl("-n", namespace, "apply", "--server-side", "-f", str(GRANT))
    assert can(cluster, "get", f"secret/{tls_name}", "-n", namespace)
    assert not can(cluster, "get", "secret/st-marys-http-clients", "-n", namespace)
    assert not can(cluster, "list", "secrets", "-n", namespace)
    wait_ready(cluster, namespace)
    assert degraded()["status"] == "False"


def test_invalid_stored_object_is_degraded_without_retry_storm(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    """An object stored under a looser CRD (as after a CRD upgrade) that today's model
    refuses: Degraded with the field and the reason, and no writes while it stays so."""
    crd = cluster.kubectl_json("get", "crd", "imagingsites.telerad.io")
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    original = copy.deepcopy(spec_schema["properties"]["aeTitle"])
    loose = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/aeTitle"
    cluster.kubectl(
        "patch", "crd", "imagingsites.telerad.io", "--type=json",
        "-p", json.dumps([{"op": "replace", "path": loose, "value": {"type": "string"}}]),
    )  # fmt: skip
    try:
        site = copy.deepcopy(
            next(e.obj for e in SAMPLES if e.obj["metadata"]["name"] == "riverside-imaging")
        )
        site["spec"]["aeTitle"] = "BAD\\\\AE"
        eventually(
            lambda: (
                cluster.kubectl(
                    "-n", namespace, "apply", "-f", "-", input=json.dumps(site), check=False
                ).returncode
                == 0
            ),
            "the loosened CRD to accept the object",
        )
    finally:
        cluster.kubectl(
            "patch", "crd", "imagingsites.telerad.io", "--type=json",
            "-p", json.dumps([{"op": "replace", "path": loose, "value": original}]),
        )  # fmt: skip

    def degraded() -> dict[str, Any] | None:
        status = get(cluster, namespace, "imagingsite", "riverside-imaging").get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Degraded"), None)

    eventually(lambda: (degraded() or {}).get("reason") == "InvalidSpec", "Degraded InvalidSpec")
    assert "spec.aeTitle" in degraded()["message"]
    assert "BAD" not in degraded()["message"]  # field paths and reasons, never values
    assert (
        cluster.kubectl(
            "-n", namespace, "get", "deployment", "riverside-imaging-gateway", check=False
        ).returncode
        != 0
    )
    settle(operator)
    quiet_from = now()
    settle(operator)
    assert operator.writes_in(namespace, quiet_from) == []


def test_a_shared_site_rolls_its_gateways_without_fewer_ready_than_its_replicas(
    cluster: Cluster, operator: Operator, namespace: str
) -> None:
    site = {
        "apiVersion": "telerad.io/v1alpha1",
        "kind": "ImagingSite",
        "metadata": {"name": "harbour"},
        "spec": {
            "aeTitle": "HARBOUR",
            "allowedCallers": [{"aeTitle": "CT01"}],
            "catalog": {"secretRef": {"name": "tenant-db-app"}},
            "storage": {"hot": {"size": "10Gi", "objectStore": {"bucket": "harbour-hot"}}},
            "gateway": {"deidentificationKeyRef": {"name": "harbour-deid", "key": "key"}},
        },
    }
    apply = ("-n", namespace, "apply", "--server-side", "-f", "-")
    cluster.kubectl(*apply, input=json.dumps(site))

    def ready_pods() -> set[str]:
        pods = cluster.client(namespace).list(Pod, labels={"app.kubernetes.io/instance": "harbour"})
        return {p.metadata.name for p in pods if _ready(p)}

    eventually(lambda: len(ready_pods()) == 2, "two ready gateways")
    gateway = get(cluster, namespace, "deployment", "harbour-gateway")
    assert gateway["spec"]["replicas"] == 2
    assert gateway["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    budget = get(cluster, namespace, "poddisruptionbudget", "harbour-gateway")
    assert budget["spec"]["maxUnavailable"] == 1
    eventually(lambda: budget_allows(cluster, namespace) == 1, "the budget to allow one eviction")
    assert not cluster.kubectl_json("-n", namespace, "get", "pvc")["items"]
    status = get(cluster, namespace, "imagingsite", "harbour")["status"]
    assert status["gateways"] == "2 replicas"

    # Every change of a pod, watched while a config change rolls both.
    seen: list[int] = []
    stop = threading.Event()
    before = ready_pods()

    def watch() -> None:
        ready: set[str] = set(before)
        client = cluster.client(namespace)
        try:
            for _, pod in client.watch(Pod, labels={"app.kubernetes.io/instance": "harbour"}):
                if stop.is_set():
                    return
                (ready.add if _ready(pod) else ready.discard)(pod.metadata.name)
                seen.append(len(ready))
        except httpx.HTTPError:
            if not stop.is_set():  # else: the API server went at the session's end
                raise

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(1)  # the watch is open before the change
    site["spec"]["completion"] = {"quietSeconds": 45}
    cluster.kubectl(*apply, input=json.dumps(site))
    eventually(
        lambda: (now_ready := ready_pods()) and len(now_ready) == 2 and not now_ready & before,
        "two new ready gateways in place of the old ones",
    )
    stop.set()  # the watch thread (a daemon) ends at its next event
    counts = list(seen)
    # Four pods came and went: two new ones ready, two old ones gone.
    assert len(counts) >= 4, counts
    assert min(counts) >= 2, counts


def _ready(pod: Pod) -> bool:
    if pod.metadata.deletionTimestamp is not None or pod.status is None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def budget_allows(cluster: Cluster, namespace: str) -> int:
    budget = get(cluster, namespace, "poddisruptionbudget", "harbour-gateway")
    return int((budget.get("status") or {}).get("disruptionsAllowed", -1))
