"""The Kubernetes manifests, checked without a cluster.

    python -m pytest tests/test_deploy_manifests.py

Every kustomization renders the expected objects; the gates of checks/manifests.py
(`kubernetes-validate --strict` for GKE's stable channel, the PodMonitoring and Rules schemas) reject broken
manifests (the pre-commit hook runs that script on the real ones, so `make test` does); the objects
agree with each other. The deploy script is tested in tests/test_deploy_script.py, the pod run with
Docker in tests/test_deploy_pod.py, and TorchServe's config of the pod in tests/test_tsconfig.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema
import pytest

from checks.manifests import (
    GKE_STABLE,
    OVERLAYS,
    core_objects,
    podmonitoring_schema,
    render,
    rules_schema,
    validate,
)
from serving import REPO
from serving.tsconfig import parse_properties
from serving.tsconfig import render as render_config
from tests.containers import deployment_containers, find


@pytest.fixture(scope="module")
def gke() -> list[dict[str, Any]]:
    return render("overlays/gke")


# --- rendering and schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomization_renders_the_service(overlay: str) -> None:
    kinds = sorted(d["kind"] for d in render(overlay))
    expected = ["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy"]
    expected += ["PodDisruptionBudget", "Service"]
    if overlay == "overlays/gke":
        expected += ["Namespace", "NetworkPolicy", "PodMonitoring", "Rules"]
    assert kinds == sorted(expected)


def test_strict_validation_catches_an_unknown_field(gke: list[dict[str, Any]]) -> None:
    """The gate is live: a misspelt field fails it."""
    docs = copy.deepcopy(core_objects(gke))
    find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert validate(docs, GKE_STABLE[-1]).returncode != 0


@pytest.mark.parametrize(
    "mutation",
    [
        lambda pm: pm["spec"]["endpoints"][0].update(intervall="30s"),
        lambda pm: pm["spec"]["endpoints"][0].update(interval="30 seconds"),
        lambda pm: pm["spec"].pop("selector"),
    ],
    ids=["unknown-field", "bad-duration", "no-selector"],
)
def test_podmonitoring_schema_rejects_mistakes(gke: list[dict[str, Any]], mutation) -> None:
    monitoring = copy.deepcopy(find(gke, "PodMonitoring"))
    mutation(monitoring)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitoring, podmonitoring_schema())


def test_rules_match_the_documented_crd(gke: list[dict[str, Any]]) -> None:
    jsonschema.validate(find(gke, "Rules"), rules_schema())


@pytest.mark.parametrize(
    "mutation",
    [
        lambda r: r["spec"]["groups"][0].update(intervall="30s"),
        lambda r: r["spec"]["groups"][0].update(interval="30 seconds"),
        lambda r: r["spec"]["groups"][0]["rules"][0].update(alert="Both"),
        lambda r: r["spec"]["groups"][0]["rules"][-1].pop("expr"),
    ],
    ids=["unknown-field", "bad-duration", "record-and-alert", "no-expr"],
)
def test_rules_schema_rejects_mistakes(gke: list[dict[str, Any]], mutation) -> None:
    resource = copy.deepcopy(find(gke, "Rules"))
    mutation(resource)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(resource, rules_schema())


# --- the objects agree with each other ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "selector"),
    [
        ("Service", lambda o: o["spec"]["selector"]),
        ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"]),
        ("PodMonitoring", lambda o: o["spec"]["selector"]["matchLabels"]),
        ("NetworkPolicy", lambda o: o["spec"]["podSelector"]["matchLabels"]),
    ],
)
def test_selectors_match_the_pods(gke: list[dict[str, Any]], kind: str, selector) -> None:
    pod_labels = find(gke, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for obj in (d for d in gke if d["kind"] == kind):
        assert selector(obj).items() <= pod_labels.items(), obj["metadata"]["name"]


def test_autoscaler_targets_the_deployment_from_its_replica_count(gke: list[dict[str, Any]]) -> None:
    deployment, hpa = find(gke, "Deployment"), find(gke, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fashion-mnist",
    }
    assert 2 <= deployment["spec"]["replicas"] == hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_clients_reach_only_the_proxy(gke: list[dict[str, Any]]) -> None:
    service = find(gke, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert [p["name"] for p in deployment_containers(gke)["proxy"]["ports"]] == ["http"]


def test_network_policies_admit_the_proxy_and_the_metrics_scrape_only(gke: list[dict[str, Any]]) -> None:
    rules = [rule for d in gke if d["kind"] == "NetworkPolicy" for rule in d["spec"].get("ingress", [])]
    assert sorted(port["port"] for rule in rules for port in rule["ports"]) == ["http", "metrics"]
    metrics_rule = next(rule for rule in rules if rule["ports"][0]["port"] == "metrics")
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gmp-system"}}}
    ]


def test_podmonitoring_scrapes_the_metrics_port(gke: list[dict[str, Any]]) -> None:
    port_names = {p["name"] for c in deployment_containers(gke).values() for p in c.get("ports", [])}
    assert {e["port"] for e in find(gke, "PodMonitoring")["spec"]["endpoints"]} == {"metrics"} <= port_names


def test_config_comes_from_configmaps(gke: list[dict[str, Any]]) -> None:
    volumes = find(gke, "Deployment")["spec"]["template"]["spec"]["volumes"]
    mounted = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    assert mounted == {d["metadata"]["name"] for d in gke if d["kind"] == "ConfigMap"}
    env = {e["name"]: e["value"] for e in deployment_containers(gke)["torchserve"]["env"]}
    assert env["TS_CONFIG_FILE"] == "/etc/fashion-mnist/torchserve/config.properties"


@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_every_container_is_hardened(gke: list[dict[str, Any]], name: str) -> None:
    """What GKE's Pod Security "restricted" profile demands, and a read-only root on top."""
    pod = find(gke, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert deployment_containers(gke)[name]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_every_container_has_requests_limits_and_three_probes(gke: list[dict[str, Any]], name: str) -> None:
    container = deployment_containers(gke)[name]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()


def test_deployment_runs_the_serving_image(gke: list[dict[str, Any]]) -> None:
    assert {c["image"].split(":")[0] for c in deployment_containers(gke).values()} == {"fashion-mnist-serve"}


def test_grace_period_covers_the_drain(gke: list[dict[str, Any]]) -> None:
    """TorchServe outlives the proxy's drain, and both end well inside the grace period."""
    pre_stop = {
        name: c["lifecycle"]["preStop"]["sleep"]["seconds"] for name, c in deployment_containers(gke).items()
    }
    grace = find(gke, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop["torchserve"] > pre_stop["proxy"]
    # TorchServe drains (docker/drain.py gives up after 3 s) and stops in about 3 s more
    # (test_pod_deletion_drains_cleanly measures it).
    assert grace >= pre_stop["torchserve"] + 10


def test_proxy_body_limit_matches_torchserve() -> None:
    nginx = (REPO / "deploy" / "base" / "proxy" / "nginx.conf").read_text(encoding="utf-8")
    megabytes = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    pod = parse_properties(render_config("pod"))
    assert megabytes * 2**20 == int(pod["max_request_size"])
