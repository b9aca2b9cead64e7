"""Property: the pydantic models and the API server agree on every object.

Hypothesis builds ImagingSite, AIModel and RoutingPolicy objects whose fields are drawn
from both sides of every constraint (lengths, ranges, patterns, enums, duplicates,
cross-field rules, unknown fields). Each object goes to the real API server as a
server-side dry run with strict field validation, and to ``from_wire``; the two must
accept and refuse exactly the same objects.
"""

from __future__ import annotations

import json
import string
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from telerad.api.types import CIDR, HTTP_URL, Modality
from tests.api_examples import MODELS
from tests.cluster.conftest import Cluster

PLURALS = {"ImagingSite": "imagingsites", "AIModel": "aimodels", "RoutingPolicy": "routingpolicies"}
EXAMPLES = 300


def obj(kind: str, name: st.SearchStrategy[str], spec: st.SearchStrategy[dict[str, Any]]) -> Any:
    return st.builds(
        lambda n, s: {
            "apiVersion": "telerad.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": n},
            "spec": s,
        },
        name,
        spec,
    )


printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


def objects(wrong: bool) -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    """Objects of each kind. With ``wrong`` every field may also take values on the wrong
    side of its constraints; without, single values are valid, and what can still be
    refused comes from cross-field rules, duplicates and names over their budget."""

    def pick(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return good | bad if wrong else good

    def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
        # The bounds themselves and their neighbours, where off-by-one errors live.
        return pick(
            st.sampled_from([lo, hi]) | st.integers(lo, hi), st.sampled_from([lo - 1, hi + 1])
        )

    def choice(good: list[Any], bad: list[Any]) -> st.SearchStrategy[Any]:
        return pick(st.sampled_from(good), st.sampled_from(bad))

    def ratio() -> st.SearchStrategy[float]:
        return pick(st.floats(0, 1), st.floats(-0.5, 1.5, allow_nan=False))

    ae_title = pick(
        st.text(
            alphabet=string.ascii_uppercase + string.digits + "_ ", min_size=1, max_size=16
        ).filter(lambda t: t.strip()),
        st.text(alphabet=string.ascii_uppercase + " -\\\t~é", min_size=0, max_size=18),
    )
    dns_label = pick(
        st.from_regex(r"[a-z]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True),
        st.sampled_from(["1abc", "a.b", "Upper", "a-", "-a", "x" * 64, ""]),
    )
    # Names around each kind's budget (50 and 56 characters) are valid Kubernetes names
    # either way, so they are drawn in both modes.
    name_near_budget = dns_label | st.integers(45, 63).map(lambda n: "n" * n)
    port = ints(1, 65535)
    cidr = pick(
        st.from_regex(CIDR, fullmatch=True),
        st.sampled_from(["10.0.0.0/33", "10.0.0/8", "foo", "10.0.0.0", "1.2.3.4/08", "fd00::/129"]),
    )
    url = pick(
        st.from_regex(HTTP_URL, fullmatch=True) | st.just("http://pacs:8042/dicom-web"),
        st.sampled_from(["ftp://x/y", "https://", "https:// x", "pacs:8042"]),
    )
    quantity = choice(["1Gi", "500m", "1.5G", "10", "2Ti"], ["lots", "1.", "-1Gi", "1gi"])
    uid = choice(
        ["1.2.840.10008.5.1.4.1.1.2", "0", "1.2.3"],
        ["1.2.840.01", "1..2", "1.2.a", "1." * 33 + "1"],
    )
    secret_ref = st.fixed_dictionaries(
        {"name": dns_label, "key": st.sampled_from(["token", "hmac-key"])}
    )
    unknown = (
        st.fixed_dictionaries({}, optional={"colour": st.just("blue")}) if wrong else st.just({})
    )

    def with_unknown(
        strategy: st.SearchStrategy[dict[str, Any]],
    ) -> st.SearchStrategy[dict[str, Any]]:
        return st.builds(lambda d, u: {**d, **u}, strategy, unknown)

    tier = st.fixed_dictionaries(
        {}, optional={"storageClassName": dns_label, "size": quantity, "days": ints(1, 36500)}
    )
    destination = st.fixed_dictionaries(
        {"name": choice(["pacs", "archive"], ["Bad_Name"])},
        optional={
            "dicom": st.fixed_dictionaries(
                {"host": choice(["pacs"], [""]), "aeTitle": ae_title},
                optional={"port": port, "tls": st.booleans()},
            ),
            "dicomweb": st.fixed_dictionaries({"url": url}, optional={"tokenSecret": secret_ref}),
        },
    )
    site_spec = with_unknown(
        st.fixed_dictionaries(
            {
                "aeTitle": ae_title,
                "allowedCallers": st.lists(
                    st.fixed_dictionaries(
                        {"aeTitle": st.sampled_from(["CT01", "DX02"]) | ae_title},
                        optional={"cidrs": st.lists(cidr, max_size=2), "description": printable},
                    ),
                    min_size=0 if wrong else 1,
                    max_size=3,
                ),
            },
            optional={
                "port": port,
                "httpPort": port,
                "tls": st.fixed_dictionaries(
                    {"secretName": dns_label},
                    optional={
                        "requireClientCertificate": st.booleans(),
                        "minVersion": choice(["1.2", "1.3"], ["1.1"]),
                    },
                ),
                "service": st.fixed_dictionaries(
                    {},
                    optional={
                        "type": choice(["ClusterIP", "NodePort", "LoadBalancer"], ["ExternalName"]),
                        "nodePort": ints(30000, 32767),
                        "loadBalancerSourceRanges": st.lists(cidr, max_size=2),
                    },
                ),
                "storage": st.fixed_dictionaries(
                    {}, optional={"hot": tier, "warm": tier, "retentionDays": ints(1, 40)}
                ),
                "completion": st.fixed_dictionaries({}, optional={"quietSeconds": ints(1, 86400)}),
                "destinations": st.lists(destination, max_size=2),
                "notifications": st.fixed_dictionaries(
                    {},
                    optional={
                        "webhooks": st.lists(
                            st.fixed_dictionaries(
                                {"name": st.sampled_from(["pager", "slack"]), "url": url},
                                optional={
                                    "minPriority": choice(["stat", "urgent", "routine"], ["asap"])
                                },
                            ),
                            max_size=2,
                        )
                    },
                ),
                "dimse": st.fixed_dictionaries(
                    {},
                    optional={
                        "maxAssociations": ints(1, 1024),
                        "maxPDULength": ints(4096, 4194304),
                    },
                ),
                "resources": st.fixed_dictionaries(
                    {},
                    optional={
                        "requests": st.dictionaries(st.sampled_from(["cpu", "memory"]), quantity)
                    },
                ),
            },
        )
    )

    modality = choice([m.value for m in Modality], ["XRAY", "ct"])
    body_part = choice(["HEAD", "CHEST", "BRAIN"], ["head", "BODY PART", "A" * 17])
    clock = choice(["07:00", "23:59", "00:00"], ["24:00", "7:00", "07:60"])
    model_spec = with_unknown(
        st.fixed_dictionaries(
            {
                "image": choice(["ghcr.io/telerad/worker:0.1.0"], [""]),
                "model": st.fixed_dictionaries(
                    {
                        "name": choice(["ct-head-hyperdensity", "a.b_c-1"], ["Bad Name", ""]),
                        "version": choice(["0.1.0"], [""]),
                    }
                ),
                "intendedUse": st.fixed_dictionaries(
                    {"modalities": st.lists(modality, min_size=0 if wrong else 1, max_size=3)},
                    optional={
                        "bodyParts": st.lists(body_part, max_size=2),
                        "sopClasses": st.lists(uid, max_size=2),
                    },
                ),
            },
            optional={
                "gpu": st.fixed_dictionaries(
                    {},
                    optional={
                        "count": ints(0, 16),
                        "nodeSelector": st.dictionaries(
                            st.sampled_from(["zone", "pool"]),
                            choice(["a", "gpu-pool"], ["x" * 64]),
                            max_size=2,
                        ),
                        "tolerations": st.lists(
                            st.fixed_dictionaries(
                                {},
                                optional={
                                    "key": st.sampled_from(["nvidia.com/gpu", "dedicated"]),
                                    "operator": choice(["Exists", "Equal"], ["Matches"]),
                                    "effect": choice(["NoSchedule", "NoExecute"], ["Never"]),
                                    "tolerationSeconds": ints(0, 10),
                                },
                            ),
                            max_size=2,
                        ),
                    },
                ),
                "scaling": st.fixed_dictionaries(
                    {},
                    optional={
                        "minReplicas": ints(0, 6),
                        "maxReplicas": ints(1, 6),
                        "targetQueueDepthPerReplica": ints(1, 3),
                        "targetGPUUtilization": ints(1, 100),
                        "scaleDownStabilizationSeconds": ints(0, 86400),
                        "keepWarmForUrgent": st.fixed_dictionaries(
                            {},
                            optional={
                                "windows": st.lists(
                                    st.fixed_dictionaries({"start": clock, "end": clock}),
                                    max_size=2,
                                ),
                                "timeZone": st.sampled_from(["UTC", "Europe/London"]),
                            },
                        ),
                    },
                ),
                "replicas": ints(0, 3),
                "thresholds": st.fixed_dictionaries(
                    {},
                    optional={
                        "critical": ratio(),
                        "findings": st.dictionaries(
                            st.sampled_from(["bleed", "pneumothorax"]), ratio(), max_size=2
                        ),
                    },
                ),
                "thirdParty": st.booleans(),
            },
        )
    )

    names = st.lists(dns_label, max_size=2)
    selector = st.fixed_dictionaries(
        {},
        optional={
            "matchLabels": st.dictionaries(
                st.sampled_from(["region", "tier"]), choice(["north"], ["x" * 64]), max_size=2
            ),
            "matchExpressions": st.lists(
                st.fixed_dictionaries(
                    {
                        "key": choice(["region"], [""]),
                        "operator": choice(["In", "NotIn", "Exists"], ["Near"]),
                    },
                    optional={"values": st.lists(st.sampled_from(["north", "south"]), max_size=2)},
                ),
                max_size=2,
            ),
        },
    )
    # Exactly one of names and selector, or (wrong) any combination of them.
    sites = (
        st.fixed_dictionaries({}, optional={"names": names, "selector": selector})
        if wrong
        else st.fixed_dictionaries({"names": names}) | st.fixed_dictionaries({"selector": selector})
    )
    rule_name = pick(st.sampled_from(["ed-head-ct", "chest"]) | dns_label, st.just("Bad_Rule"))

    policy_spec = with_unknown(
        st.fixed_dictionaries(
            {
                "sites": sites,
                "rules": st.lists(
                    st.fixed_dictionaries(
                        {
                            "name": rule_name,
                            "models": st.lists(
                                choice(["ct-head", "cxr"], ["Bad.Model"]),
                                min_size=0 if wrong else 1,
                                max_size=2,
                            ),
                        },
                        optional={
                            "match": st.fixed_dictionaries(
                                {},
                                optional={
                                    "modalities": st.lists(modality, max_size=2),
                                    "bodyParts": st.lists(body_part, max_size=2),
                                    "sopClasses": st.lists(uid, max_size=1),
                                    "callingAETitles": st.lists(ae_title, max_size=2),
                                    "studyDescription": st.text(
                                        alphabet=string.ascii_uppercase + "*? ",
                                        min_size=0 if wrong else 1,
                                        max_size=66 if wrong else 64,
                                    ),
                                },
                            ),
                            "priority": choice(["stat", "urgent", "routine"], ["asap"]),
                            "deidentify": st.booleans(),
                            "notify": st.booleans(),
                        },
                    ),
                    min_size=0 if wrong else 1,
                    max_size=3,
                ),
            },
        )
    )

    return {
        "ImagingSite": obj("ImagingSite", name_near_budget, site_spec),
        "AIModel": obj("AIModel", name_near_budget, model_spec),
        "RoutingPolicy": obj("RoutingPolicy", dns_label, policy_spec),
    }


OBJECTS = {
    kind: st.one_of(valid, mixed)
    for (kind, valid), mixed in zip(
        objects(wrong=False).items(), objects(wrong=True).values(), strict=True
    )
}


def server_accepts(http: httpx.Client, namespace: str, body: dict[str, Any]) -> tuple[bool, str]:
    resp = http.post(
        f"/apis/telerad.io/v1alpha1/namespaces/{namespace}/{PLURALS[body['kind']]}",
        params={"dryRun": "All", "fieldValidation": "Strict"},
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    if resp.status_code == 201:
        return True, ""
    if resp.status_code not in (400, 422):
        raise AssertionError(f"unexpected answer {resp.status_code}: {resp.text}")
    return False, resp.json().get("message", resp.text)


def model_accepts(body: dict[str, Any]) -> tuple[bool, str]:
    try:
        MODELS[body["kind"]].from_wire(body)
    except ValidationError as err:
        return False, str(err)
    return True, ""


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("kind", list(OBJECTS))
def test_model_and_api_server_accept_the_same_objects(
    cluster: Cluster, namespace: str, kind: str
) -> None:
    outcomes = {True: 0, False: 0}
    with cluster.http() as http:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(OBJECTS[kind])
        def agree(body: dict[str, Any]) -> None:
            server_ok, server_why = server_accepts(http, namespace, body)
            model_ok, model_why = model_accepts(body)
            assert server_ok == model_ok, (
                f"server {'accepts' if server_ok else 'refuses'} but model "
                f"{'accepts' if model_ok else 'refuses'}:\n{json.dumps(body, indent=1)}\n"
                f"server: {server_why}\nmodel: {model_why}"
            )
            outcomes[server_ok] += 1

        agree()
    print(f"{kind}: {outcomes}")
    # The corpus must exercise both sides, or the property says nothing.
    assert outcomes[True] >= EXAMPLES // 10, outcomes
    assert outcomes[False] >= EXAMPLES // 10, outcomes
