"""The operator's pure parts: routing verdicts and compilation, child builders, and the
comparison that decides whether a write is needed."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from lightkube.utils.quantity import parse_quantity

from telerad.api.aimodel import AIModel
from telerad.api.config import WorkerConfig
from telerad.api.routing import RoutingPolicy
from telerad.api.site import ImagingSite
from telerad.api.types import quantity_bytes
from telerad.operator.builders import model as model_builders
from telerad.operator.builders import routing
from telerad.operator.builders import site as site_builders
from telerad.operator.builders.common import CONFIG_HASH_ANNOTATION
from telerad.operator.k8s import contains
from telerad.operator.settings import OperatorSettings
from tests.api_examples import samples

SAMPLES = {e.obj["metadata"]["name"]: e.obj for e in samples()}
SETTINGS = OperatorSettings(image="registry.invalid/telerad:test")


def owner(name: str) -> dict[str, Any]:
    body = copy.deepcopy(SAMPLES[name])
    body["metadata"].update(namespace="tenant-a", uid=f"uid-{name}", generation=1)
    return body


def models() -> dict[str, AIModel]:
    return {n: AIModel.from_wire(SAMPLES[n]) for n in ("ct-head-hyperdensity", "chest-xray-triage")}


def policy(rules: list[dict[str, Any]], **sites: Any) -> RoutingPolicy:
    return RoutingPolicy.from_wire(
        {
            "metadata": {"name": "p"},
            "spec": {"sites": sites or {"names": ["st-marys"]}, "rules": rules},
        }
    )


def test_sample_policy_is_accepted_without_warnings() -> None:
    verdict = routing.evaluate(RoutingPolicy.from_wire(SAMPLES["default-routing"]), models())
    assert verdict.accepted
    assert verdict.warnings == []


def test_missing_model_names_rule_and_model() -> None:
    verdict = routing.evaluate(
        policy([{"name": "r1", "match": {"modalities": ["CT"]}, "models": ["ghost"]}]), models()
    )
    assert not verdict.resolved
    assert not verdict.accepted
    assert verdict.missing == [
        "rule 'r1' names AIModel 'ghost', which does not exist in this namespace"
    ]


@pytest.mark.parametrize(
    ("match", "problem"),
    [
        ({"modalities": ["MR"]}, "sends modality MR to AIModel 'ct-head-hyperdensity'"),
        ({}, "matches every modality, but AIModel 'ct-head-hyperdensity' is intended for CT only"),
        ({"modalities": ["CT"]}, "matches every body part, but AIModel 'ct-head-hyperdensity'"),
        ({"modalities": ["CT"], "bodyParts": ["CHEST"]}, "sends body part CHEST"),
        (
            {"modalities": ["CT"], "bodyParts": ["HEAD"], "sopClasses": ["1.2.3"]},
            "sends SOP class 1.2.3",
        ),
    ],
)
def test_outside_intended_use_is_refused(match: dict[str, Any], problem: str) -> None:
    verdict = routing.evaluate(
        policy([{"name": "r", "match": match, "models": ["ct-head-hyperdensity"]}]), models()
    )
    assert verdict.resolved
    assert not verdict.accepted
    assert problem in verdict.uncovered[0]


def test_rule_without_sop_classes_is_inside_intended_use() -> None:
    rule = {
        "name": "r",
        "match": {"modalities": ["CT"], "bodyParts": ["HEAD"]},
        "models": ["ct-head-hyperdensity"],
    }
    assert routing.evaluate(policy([rule]), models()).accepted


def test_shadowed_rule_is_reported() -> None:
    broad = {
        "name": "all-ct-head",
        "match": {"modalities": ["CT"], "bodyParts": ["HEAD"]},
        "models": ["ct-head-hyperdensity"],
    }
    narrow = {
        "name": "ed-ct-head",
        "match": {"modalities": ["CT"], "bodyParts": ["HEAD"], "callingAETitles": ["ED_CT"]},
        "models": ["ct-head-hyperdensity"],
        "priority": "stat",
    }
    verdict = routing.evaluate(policy([broad, narrow]), models())
    assert verdict.accepted
    assert verdict.warnings == [
        "rule 'ed-ct-head' can never match: "
        "the earlier rule 'all-ct-head' takes every study it would"
    ]
    assert routing.evaluate(policy([narrow, broad]), models()).warnings == []


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({"matchLabels": {"region": "north"}}, {"region": "north"}, True),
        ({"matchLabels": {"region": "north"}}, {"region": "south"}, False),
        (
            {"matchExpressions": [{"key": "region", "operator": "In", "values": ["a", "b"]}]},
            {"region": "b"},
            True,
        ),
        ({"matchExpressions": [{"key": "region", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"region": "a"}, False),
        (
            {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]},
            {"region": "a"},
            True,
        ),
        ({}, {"anything": "x"}, True),
    ],
)
def test_site_selection(selector: dict[str, Any], labels: dict[str, str], selected: bool) -> None:
    rule = {
        "name": "r",
        "match": {"modalities": ["CT"], "bodyParts": ["HEAD"]},
        "models": ["ct-head-hyperdensity"],
    }
    assert routing.selects(policy([rule], selector=selector), "any", labels) is selected


def test_compiled_rules_keep_order_and_deidentify_for_third_parties() -> None:
    sample = RoutingPolicy.from_wire(SAMPLES["default-routing"])
    rules = routing.compile_rules("st-marys", {"telerad.io/region": "north"}, [sample], models())
    assert [r.name for r in rules] == ["ed-head-ct", "ed-chest-xray", "chest-xray", "head-ct"]
    by_name = {r.name: r for r in rules}
    assert by_name["chest-xray"].deidentify  # chest-xray-triage is third party
    assert not by_name["head-ct"].deidentify
    assert by_name["ed-head-ct"].models[0].intended_use.modalities == ["CT"]
    assert (
        routing.compile_rules("st-marys", {"telerad.io/region": "west"}, [sample], models()) == []
    )
    refused = policy(
        [{"name": "r", "match": {"modalities": ["MR"]}, "models": ["ct-head-hyperdensity"]}]
    )
    assert routing.compile_rules("st-marys", {}, [refused], models()) == []


def site_children(name: str, rules: list[Any] | None = None) -> dict[str, dict[str, Any]]:
    body = owner(name)
    site = ImagingSite.from_wire(body)
    built = site_builders.children(body, site, rules or [], SETTINGS)
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in built}


def test_site_children_names_labels_and_owners() -> None:
    children = site_children("st-marys")
    assert sorted(children) == [
        "ConfigMap/st-marys-gateway",
        "Deployment/st-marys-gateway",
        "NetworkPolicy/st-marys-gateway",
        "PersistentVolumeClaim/st-marys-gateway-hot",
        "PersistentVolumeClaim/st-marys-gateway-warm",
        "Service/st-marys-gateway",
        "ServiceAccount/st-marys-gateway",
    ]
    for key, child in children.items():
        labels = child["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "telerad-operator"
        assert labels["app.kubernetes.io/instance"] == "st-marys"
        refs = child["metadata"].get("ownerReferences", [])
        # st-marys keeps its volumes (Retain): no owner, so deleting the site leaves them.
        assert (refs == []) == key.startswith("PersistentVolumeClaim/")
    riverside = site_children("riverside-imaging")
    assert (
        riverside["PersistentVolumeClaim/riverside-imaging-gateway-hot"]["metadata"][
            "ownerReferences"
        ][0]["uid"]
        == "uid-riverside-imaging"
    )


def test_gateway_deployment_is_hardened_and_rolls_on_config_change() -> None:
    deployment = site_children("st-marys")["Deployment/st-marys-gateway"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "registry.invalid/telerad:test"
    names_ = {v["name"] for v in pod["volumes"]}
    assert names_ == {"config", "tmp", "hot", "warm", "tls", "tokens", "secret-0"}
    tokens = next(v for v in pod["volumes"] if v["name"] == "tokens")
    assert tokens["secret"] == {"secretName": "st-marys-http-clients"}
    # The paging webhook's signing key, and only that key of its Secret.
    paging = next(v for v in pod["volumes"] if v["name"] == "secret-0")
    assert paging["secret"] == {
        "secretName": "st-marys-paging",
        "items": [{"key": "hmac-key", "path": "hmac-key"}],
    }
    riverside = site_children("riverside-imaging")["Deployment/riverside-imaging-gateway"]
    riverside_pod = riverside["spec"]["template"]["spec"]
    # Only the key a destination names is mounted, where the gateway's config says.
    (secret,) = [v for v in riverside_pod["volumes"] if v["name"].startswith("secret-")]
    assert secret["secret"] == {
        "secretName": "riverside-archive-token",
        "items": [{"key": "token", "path": "token"}],
    }
    (mount,) = [
        m for m in riverside_pod["containers"][0]["volumeMounts"] if m["name"] == secret["name"]
    ]
    assert mount["mountPath"] == "/etc/telerad/secrets/riverside-archive-token"
    rules = routing.compile_rules(
        "st-marys",
        {"telerad.io/region": "north"},
        [RoutingPolicy.from_wire(SAMPLES["default-routing"])],
        models(),
    )
    rolled = site_children("st-marys", rules)["Deployment/st-marys-gateway"]
    annotation = spec["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert (
        rolled["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] != annotation
    )


@pytest.mark.reliability(
    "attack", "gateway NetworkPolicy: exactly the peers DESIGN.md names (rendered; needs a CNI)"
)
def test_network_policy_opens_dicom_to_callers_and_http_to_workers() -> None:
    policy = site_children("st-marys")["NetworkPolicy/st-marys-gateway"]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "st-marys"
    assert policy["policyTypes"] == ["Ingress"]
    ingress = policy["ingress"]
    dicom, http = ingress  # and nothing else: every other port of the pod is closed
    assert http["ports"] == [{"protocol": "TCP", "port": 8080}]
    # The workers are the tenant's own: a podSelector without a namespaceSelector only
    # matches pods of the policy's namespace.
    assert "namespaceSelector" not in http["from"][0]
    assert dicom["ports"] == [{"protocol": "TCP", "port": 11112}]
    assert sorted(f["ipBlock"]["cidr"] for f in dicom["from"]) == [
        "198.51.100.10/32",
        "203.0.113.0/28",
    ]
    assert http["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert http["from"][1]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    # The operator's pods only (its autoscaler), not its whole namespace.
    assert http["from"][2] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "telerad-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "telerad-operator"}},
    }
    assert len(http["from"]) == 3
    body = owner("riverside-imaging")
    body["spec"]["allowedCallers"].append({"aeTitle": "ANYWHERE"})
    site = ImagingSite.from_wire(body)
    open_rule = site_builders.network_policy(body, site, SETTINGS)["spec"]["ingress"][0]
    assert "from" not in open_rule  # a caller without networks: the AE allow-list decides


def test_worker_deployment_requests_gpus_and_tolerates_the_taint() -> None:
    body = owner("ct-head-hyperdensity")
    model = AIModel.from_wire(body)
    st_marys = ImagingSite.from_wire(owner("st-marys"))
    children = {
        c["kind"]: c for c in model_builders.children(body, model, {"st-marys": st_marys}, SETTINGS)
    }
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0] == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    config = WorkerConfig.model_validate(
        yaml.safe_load(children["ConfigMap"]["data"]["worker.yaml"])
    )
    (gateway,) = config.gateways
    assert config.inference_server is None
    # The site serves HTTPS and asks for tokens: the worker gets its token and the CA, and
    # only those two keys of the two Secrets.
    assert str(gateway.url) == "https://st-marys-gateway.tenant-a.svc:8080"
    assert gateway.token_file == Path("/etc/telerad/gateways/st-marys/token")
    assert gateway.ca_file == Path("/etc/telerad/gateways/st-marys/ca.crt")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "gw-st-marys")
    assert mount == {
        "name": "gw-st-marys",
        "mountPath": "/etc/telerad/gateways/st-marys",
        "readOnly": True,
    }
    volume = next(v for v in pod["volumes"] if v["name"] == "gw-st-marys")
    assert volume["projected"]["sources"] == [
        {
            "secret": {
                "name": "st-marys-http-clients",
                "items": [{"key": "worker", "path": "token"}],
            }
        },
        {"secret": {"name": "st-marys-dicom-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]
    body["spec"]["gpu"] = {"count": 0}
    cpu = model_builders.deployment(body, AIModel.from_wire(body), children["ConfigMap"], SETTINGS)
    assert "tolerations" not in cpu["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["spec"]["template"]["spec"]["containers"][0][
        "resources"
    ].get("limits", {})


def test_a_model_on_an_inference_server_gets_it_in_its_worker_config() -> None:
    body = owner("ct-head-hyperdensity")
    body["spec"]["inferenceServer"] = {"url": "http://localhost:8000", "model": "ct"}
    model = AIModel.from_wire(body)
    (config_map, *_) = model_builders.children(body, model, {}, SETTINGS)
    config = WorkerConfig.model_validate(yaml.safe_load(config_map["data"]["worker.yaml"]))
    assert config.inference_server is not None
    assert (str(config.inference_server.url), config.inference_server.model) == (
        "http://localhost:8000",
        "ct",
    )


def test_worker_replicas_are_applied_only_when_fixed_by_spec_replicas() -> None:
    """Left out, they are the autoscaler's (scale subresource); an apply that named them
    would undo its every decision at the next resync."""
    body = owner("chest-xray-triage")
    model = AIModel.from_wire(body)
    deployment = next(
        c for c in model_builders.children(body, model, {}, SETTINGS) if c["kind"] == "Deployment"
    )
    assert "replicas" not in deployment["spec"]
    body["spec"]["replicas"] = 3
    model = AIModel.from_wire(body)
    deployment = next(
        c for c in model_builders.children(body, model, {}, SETTINGS) if c["kind"] == "Deployment"
    )
    assert deployment["spec"]["replicas"] == 3


@pytest.mark.parametrize(
    ("want", "have", "held"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2], "c": 3}}, True),
        ({"a": [1, 2]}, {"a": [1]}, False),
        ({"a": []}, {}, True),
        ({"a": {}}, {}, True),
        ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, True),
        ({"spec": {"resources": {"cpu": "0.5"}}}, {"spec": {"resources": {"cpu": "500m"}}}, True),
        ({"spec": {"resources": {"cpu": "1"}}}, {"spec": {"resources": {"cpu": "500m"}}}, False),
        ({"spec": {"image": "0.5"}}, {"spec": {"image": "500m"}}, False),
        ({"a": "x"}, None, False),
    ],
)
def test_contains(want: Any, have: Any, held: bool) -> None:
    assert contains(want, have) is held


def test_api_errors_back_off_exponentially_to_a_ceiling() -> None:
    from telerad.operator.handlers import RETRY_MAX, backoff  # noqa: PLC0415

    delays = [backoff(r) for r in range(12)]
    assert delays[:4] == [2, 4, 8, 16]
    assert delays == sorted(delays)
    assert delays[-1] == RETRY_MAX


def test_a_site_catalog_secret_is_mounted_and_only_its_directory_rendered() -> None:
    body = owner("st-marys")
    body["spec"]["catalog"] = {"secretRef": {"name": "tenant-db-app"}}
    site = ImagingSite.from_wire(body)
    built = {c["kind"]: c for c in site_builders.children(body, site, [], SETTINGS)}
    pod = built["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "catalog"]
    # The whole Secret: uri, or host, port, dbname, user, password, as CloudNativePG has it.
    assert volume["secret"] == {"secretName": "tenant-db-app"}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "catalog"]
    assert mount == {
        "name": "catalog",
        "mountPath": "/var/run/telerad/catalog",
        "readOnly": True,
    }
    config = yaml.safe_load(built["ConfigMap"]["data"][site_builders.CONFIG_FILE])
    assert config["catalog"] == {"secretDir": "/var/run/telerad/catalog"}
    assert "tenant-db-app" not in built["ConfigMap"]["data"][site_builders.CONFIG_FILE]
    # A new catalog is a new configuration: the pod rolls onto it.
    plain = site_children("st-marys")["Deployment/st-marys-gateway"]["spec"]["template"]
    rolled = built["Deployment"]["spec"]["template"]
    assert (
        rolled["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        != plain["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    )


def test_a_site_encrypting_at_rest_mounts_its_keyring_and_names_only_its_directory() -> None:
    body = owner("st-marys")
    body["spec"]["storage"] = {"encryption": {"keySecretRef": {"name": "st-marys-keys"}}}
    site = ImagingSite.from_wire(body)
    built = {c["kind"]: c for c in site_builders.children(body, site, [], SETTINGS)}
    pod = built["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "keys"]
    # The whole Secret: every key id and `current`, updated in place when it changes.
    assert volume["secret"] == {"secretName": "st-marys-keys"}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "keys"]
    assert mount == {"name": "keys", "mountPath": "/var/run/telerad/keys", "readOnly": True}
    text = built["ConfigMap"]["data"][site_builders.CONFIG_FILE]
    assert yaml.safe_load(text)["storage"]["encryption"] == {"keyDir": "/var/run/telerad/keys"}
    assert "st-marys-keys" not in text
    plain = site_children("st-marys")
    assert (
        "encryption"
        not in yaml.safe_load(plain["ConfigMap/st-marys-gateway"]["data"]["gateway.yaml"])[
            "storage"
        ]
    )


def test_tiers_in_buckets_get_no_volume_and_their_keys_only_as_a_mounted_secret() -> None:
    body = owner("st-marys")
    warm = {"bucket": "images", "prefix": "st-marys/warm", "region": "eu-central-1"}
    cold = {"bucket": "archive", "storageClass": "DEEP_ARCHIVE", "restoreTier": "Bulk"}
    body["spec"]["storage"] = {
        "hot": {"size": "20Gi", "days": 3},
        "warm": {
            "days": 90,
            "objectStore": {
                **warm,
                "storageClass": "STANDARD_IA",
                "credentialsSecretRef": {"name": "s3-keys"},
            },
        },
        "cold": {"objectStore": cold},
        "retentionDays": 3650,
    }
    site = ImagingSite.from_wire(body)
    built = {
        f"{c['kind']}/{c['metadata']['name']}": c
        for c in site_builders.children(body, site, [], SETTINGS)
    }
    claims = [k for k in built if k.startswith("PersistentVolumeClaim/")]
    assert claims == ["PersistentVolumeClaim/st-marys-gateway-hot"]
    pod = built["Deployment/st-marys-gateway"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "s3-warm"]
    items = [{"key": k, "path": k} for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    assert volume["secret"] == {"secretName": "s3-keys", "items": items}
    assert {v["name"] for v in pod["volumes"]} >= {"hot", "s3-warm"}
    assert not {"warm", "cold", "s3-cold"} & {v["name"] for v in pod["volumes"]}
    text = built["ConfigMap/st-marys-gateway"]["data"][site_builders.CONFIG_FILE]
    storage = yaml.safe_load(text)["storage"]
    assert storage["warmStore"] == {
        "url": "s3://images/st-marys/warm",
        "region": "eu-central-1",
        "storageClass": "STANDARD_IA",
        "credentialsDir": "/var/run/telerad/s3/warm",
        "restoreTier": "Standard",
        "restoreDays": 7,
    }
    assert storage["coldStore"]["url"] == "s3://archive"
    assert storage["coldStore"]["storageClass"] == "DEEP_ARCHIVE"
    assert "credentialsDir" not in storage["coldStore"]  # the pod's own cloud identity
    assert (storage["hotDays"], storage["warmDays"], storage["retentionDays"]) == (3, 90, 3650)
    assert "warmDir" not in storage and "coldDir" not in storage
    assert "s3-keys" not in text
    assert [t.to_wire() for t in site_builders.tier_status(site)] == [
        {"name": "hot", "location": "volume"},
        {
            "name": "warm",
            "location": "s3://images/st-marys/warm",
            "region": "eu-central-1",
            "storageClass": "STANDARD_IA",
        },
        {
            "name": "cold",
            "location": "s3://archive",
            "region": "us-east-1",
            "storageClass": "DEEP_ARCHIVE",
        },
    ]


def test_without_a_site_catalog_it_stays_sqlite_on_the_hot_tier() -> None:
    children = site_children("st-marys")
    pod = children["Deployment/st-marys-gateway"]["spec"]["template"]["spec"]
    assert "catalog" not in {v["name"] for v in pod["volumes"]}
    config = yaml.safe_load(children["ConfigMap/st-marys-gateway"]["data"]["gateway.yaml"])
    assert config["catalog"] == {}
    assert config["storage"]["hotDir"] == "/var/lib/telerad/hot"


def rendered_config(body: dict[str, Any]) -> dict[str, Any]:
    built = {
        c["kind"]: c
        for c in site_builders.children(body, ImagingSite.from_wire(body), [], SETTINGS)
    }
    return dict(yaml.safe_load(built["ConfigMap"]["data"][site_builders.CONFIG_FILE]))


@pytest.mark.parametrize(
    ("size", "watermark"),
    [("1Gi", (1 << 30) // 20), ("10G", 500_000_000), ("20Gi", 1 << 30), ("100Gi", 1 << 30)],
)
def test_the_hot_tier_watermark_follows_its_size(size: str, watermark: int) -> None:
    """The tier's size reaches the gateway: a twentieth of it, at most 1 GiB, so a 1 Gi
    tier is not refused every store by a fixed 1 GiB watermark."""
    body = owner("st-marys")
    body["spec"].setdefault("storage", {}).setdefault("hot", {})["size"] = size
    assert rendered_config(body)["storage"]["minFreeBytes"] == watermark


@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]),
)
def test_quantities_are_read_as_lightkube_reads_them(number: Decimal, suffix: str) -> None:
    """The API layer's own reading of a quantity agrees with the Kubernetes client's."""
    quantity = f"{number.normalize():f}{suffix}"
    assert quantity_bytes(quantity) == int(parse_quantity(quantity))


def shared_site(**gateway: Any) -> tuple[dict[str, Any], ImagingSite]:
    body = owner("st-marys")
    body["spec"]["catalog"] = {"secretRef": {"name": "tenant-db-app"}}
    body["spec"]["storage"] = {
        "hot": {"size": "20Gi", "objectStore": {"bucket": "images", "prefix": "st-marys/hot"}},
    }
    body["spec"]["gateway"] = {
        "deidentificationKeyRef": {"name": "st-marys-deid", "key": "key"},
        **gateway,
    }
    return body, ImagingSite.from_wire(body)


def test_a_shared_site_gets_two_gateways_that_roll_one_at_a_time_on_no_volume() -> None:
    body, site = shared_site(drainSeconds=45)
    built = {
        f"{c['kind']}/{c['metadata']['name']}": c
        for c in site_builders.children(body, site, [], SETTINGS)
    }
    assert not [k for k in built if k.startswith("PersistentVolumeClaim/")]
    deployment = built["Deployment/st-marys-gateway"]["spec"]
    assert deployment["replicas"] == 2
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    selector = deployment["selector"]["matchLabels"]
    budget = built["PodDisruptionBudget/st-marys-gateway"]["spec"]
    assert budget == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    pod = deployment["template"]["spec"]
    # Still accepting while its Service drops it, then 45 s of drain, then the rest.
    assert pod["terminationGracePeriodSeconds"] == 5 + 45 + site_builders.STOP_MARGIN_S
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {
        "labelSelector": {"matchLabels": selector},
        "topologyKey": "kubernetes.io/hostname",
    }
    (spread,) = pod["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"]) == (
        "topology.kubernetes.io/zone",
        "ScheduleAnyway",
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    # What is being received waits on the pod's own disk, never on a shared claim.
    assert volumes["hot"] == {"name": "hot", "emptyDir": {"sizeLimit": "20Gi"}}
    assert volumes["deid"]["secret"] == {
        "secretName": "st-marys-deid",
        "items": [{"key": "key", "path": "key"}],
    }
    text = built["ConfigMap/st-marys-gateway"]["data"][site_builders.CONFIG_FILE]
    config = yaml.safe_load(text)
    assert config["drainSeconds"] == 45
    assert config["deidentificationKeyFile"] == "/var/run/telerad/deid/key"
    assert site_builders.gateways(site) == "2 replicas"
    body, three = shared_site(replicas=3)
    assert site_builders.children(body, three, [], SETTINGS)[-1]["spec"]["replicas"] == 3
    body, one = shared_site(replicas=1)
    assert site_builders.disruption_budget(body, one) is None
    assert site_builders.gateways(one) == "1 replica (spec.gateway.replicas)"


def test_a_site_on_a_volume_keeps_one_gateway_and_says_what_more_would_need() -> None:
    children = site_children("st-marys")
    assert "PodDisruptionBudget/st-marys-gateway" not in children
    deployment = children["Deployment/st-marys-gateway"]["spec"]
    assert (deployment["replicas"], deployment["strategy"]) == (1, {"type": "Recreate"})
    assert "affinity" not in deployment["template"]["spec"]
    site = ImagingSite.from_wire(owner("st-marys"))
    assert site_builders.gateways(site) == (
        "1 replica: more need spec.catalog (the catalog is SQLite),"
        " spec.storage.hot.objectStore, spec.gateway.deidentificationKeyRef"
    )
    body, _ = shared_site()
    del body["spec"]["gateway"]["deidentificationKeyRef"]
    body["spec"]["gateway"]["replicas"] = 2
    # Each pod would make a key of its own: one study's pseudonyms would differ by pod.
    with pytest.raises(ValueError, match="more than one gateway needs"):
        ImagingSite.from_wire(body)
