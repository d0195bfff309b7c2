"""The Kubernetes manifests and the GKE scripts, checked without a cluster.

    python -m pytest tests/test_deploy.py -m "not container"    # offline: render, validate, dry-run
    python -m pytest tests/test_deploy.py                       # also runs the pod with Docker

Offline: every kustomization renders the expected objects; the gates of checks/manifests.py
(`kubernetes-validate --strict` for GKE's stable channel, the PodMonitoring and Rules schemas) reject broken
manifests (the pre-commit hook runs that script on the real ones, so `make test` does); the
objects agree with each other; scripts/deploy_gke.sh and cloudbuild.yaml are exercised with
stand-ins for gcloud, kubectl and docker (GCP is the one thing mocked). With Docker: the pod runs
from the built image exactly as rendered, its probes answer, and a deletion drains cleanly.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import yaml

from checks.manifests import (
    GKE_STABLE,
    OVERLAYS,
    core_objects,
    podmonitoring_schema,
    render,
    rules_schema,
    validate,
)
from tests.containers import REPO, Pod, build_image, find, http, wait_for
from tests.serving import png_bytes

IMAGE = "fashion-mnist-serve:test"
POD_LABELS = {"app.kubernetes.io/name": "fashion-mnist"}
# Where TorchServe must differ between the container on its own and the pod (see the config files).
POD_CONFIG_CHANGES = {
    "inference_address",
    "management_address",
    "grpc_inference_address",
    "grpc_management_address",
    "disable_token_authorization",
    "token_expiration_min",
}


def properties(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]}


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
    assert [p["name"] for p in containers(gke)["proxy"]["ports"]] == ["http"]


def test_network_policies_admit_the_proxy_and_the_metrics_scrape_only(gke: list[dict[str, Any]]) -> None:
    rules = [rule for d in gke if d["kind"] == "NetworkPolicy" for rule in d["spec"].get("ingress", [])]
    assert sorted(port["port"] for rule in rules for port in rule["ports"]) == ["http", "metrics"]
    metrics_rule = next(rule for rule in rules if rule["ports"][0]["port"] == "metrics")
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gmp-system"}}}
    ]


def test_podmonitoring_scrapes_the_metrics_port(gke: list[dict[str, Any]]) -> None:
    port_names = {p["name"] for c in containers(gke).values() for p in c.get("ports", [])}
    assert {e["port"] for e in find(gke, "PodMonitoring")["spec"]["endpoints"]} == {"metrics"} <= port_names


def test_config_comes_from_configmaps(gke: list[dict[str, Any]]) -> None:
    volumes = find(gke, "Deployment")["spec"]["template"]["spec"]["volumes"]
    mounted = {v["configMap"]["name"] for v in volumes if "configMap" in v}
    assert mounted == {d["metadata"]["name"] for d in gke if d["kind"] == "ConfigMap"}
    env = {e["name"]: e["value"] for e in containers(gke)["torchserve"]["env"]}
    assert env["TS_CONFIG_FILE"] == "/etc/fashion-mnist/torchserve/config.properties"


@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_every_container_is_hardened(gke: list[dict[str, Any]], name: str) -> None:
    """What GKE's Pod Security "restricted" profile demands, and a read-only root on top."""
    pod = find(gke, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert containers(gke)[name]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_every_container_has_requests_limits_and_three_probes(gke: list[dict[str, Any]], name: str) -> None:
    container = containers(gke)[name]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()


def test_deployment_runs_the_serving_image(gke: list[dict[str, Any]]) -> None:
    assert {c["image"].split(":")[0] for c in containers(gke).values()} == {"fashion-mnist-serve"}


def test_grace_period_covers_the_drain(gke: list[dict[str, Any]]) -> None:
    """TorchServe outlives the proxy's drain, and both end well inside the grace period."""
    pre_stop = {name: c["lifecycle"]["preStop"]["sleep"]["seconds"] for name, c in containers(gke).items()}
    grace = find(gke, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop["torchserve"] > pre_stop["proxy"]
    # TorchServe drains (docker/drain.py gives up after 3 s) and stops in about 3 s more
    # (test_pod_deletion_drains_cleanly measures it).
    assert grace >= pre_stop["torchserve"] + 10


def test_pod_config_differs_from_the_image_config_only_where_it_must() -> None:
    image = properties(REPO / "docker" / "config.properties")
    pod = properties(REPO / "deploy" / "base" / "torchserve" / "config.properties")
    changed = {key for key in image.keys() | pod.keys() if image.get(key) != pod.get(key)}
    assert changed == POD_CONFIG_CHANGES
    assert (
        pod["inference_address"].startswith("http://127.0.0.1:")
        and pod["grpc_inference_address"] == pod["grpc_management_address"] == "127.0.0.1"
        and pod["disable_token_authorization"] == "true"
    )


def test_proxy_body_limit_matches_torchserve() -> None:
    nginx = (REPO / "deploy" / "base" / "proxy" / "nginx.conf").read_text(encoding="utf-8")
    megabytes = int(re.search(r"client_max_body_size (\d+)m;", nginx).group(1))
    pod = properties(REPO / "deploy" / "base" / "torchserve" / "config.properties")
    assert megabytes * 2**20 == int(pod["max_request_size"])


# --- scripts/deploy_gke.sh and cloudbuild.yaml ------------------------------------------------------

STUB = """#!/bin/sh
# Stand-in for {tool}: records the call. Without STUB_GCP it fails: a dry run may run nothing.
echo "{tool} $*" >>"$STUB_LOG"
[ -n "$STUB_GCP" ] || exit 97
case "$*" in
*" describe "* | *"get secret"*) [ "$STUB_GCP" = existing ] ;;
*"get service"*) echo 203.0.113.10 ;;
# What would be applied: the real kubectl renders the kustomization directory.
"apply -k "*) "$STUB_KUBECTL" kustomize "$3" >"$STUB_LOG.applied" ;;
*"create secret"*)
    for arg in "$@"; do
        case "$arg" in --from-file=tokens=*) cat "${{arg#--from-file=tokens=}}" >"$STUB_LOG.token" ;; esac
    done
    ;;
esac
"""
DEPLOY_ARGS = ["--project", "demo-project", "--region", "europe-west4", "--allow-cidr", "203.0.113.7/32"]
REGISTRY_IMAGE = "europe-west4-docker.pkg.dev/demo-project/fashion-mnist/fashion-mnist-serve"


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    """Environment with gcloud, kubectl and docker replaced by recording stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "kubectl", "docker"):
        (bin_dir / tool).write_text(STUB.format(tool=tool))
        (bin_dir / tool).chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if k not in {"PROJECT_ID", "REGION", "ALLOW_CIDRS", "STUB_GCP"}
    }
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: install it (docs/deploy.md, prerequisites)"
    log = str(tmp_path / "calls.log")
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "STUB_LOG": log, "STUB_KUBECTL": kubectl}


def deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "deploy_gke.sh"
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def printed_kustomization(stdout: str) -> str:
    return stdout.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]


def test_dry_run_prints_every_step_and_runs_nothing(stubs: dict[str, str]) -> None:
    proc = deploy(stubs, "--dry-run", *DEPLOY_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert calls(stubs) == []
    steps = [
        "gcloud services enable container.googleapis.com artifactregistry.googleapis.com",
        "gcloud artifacts repositories describe fashion-mnist",
        "gcloud container clusters describe fashion-mnist",
        "gcloud auth configure-docker europe-west4-docker.pkg.dev",
        f"scripts/build_image.sh --tag {REGISTRY_IMAGE}:",
        f"docker push {REGISTRY_IMAGE}:",
        "gcloud container clusters get-credentials fashion-mnist --location europe-west4",
        "kubectl apply -f deploy/overlays/gke/namespace.yaml",
        "kubectl -n fashion-mnist get secret fashion-mnist-token",
        "cat >",
        "kubectl apply -k",
        "kubectl -n fashion-mnist rollout status deployment/fashion-mnist",
        "kubectl -n fashion-mnist get service fashion-mnist",
    ]
    printed = commands(proc.stdout)
    assert len(printed) == len(steps)
    for command, step in zip(printed, steps, strict=True):
        assert command.startswith(step), (command, step)
    assert 'curl -H "Authorization: Bearer $TOKEN"' in proc.stdout


@pytest.mark.parametrize(
    ("mode", "create"),
    [
        ("autopilot", "gcloud container clusters create-auto fashion-mnist"),
        ("standard", "gcloud container clusters create fashion-mnist"),
    ],
)
def test_dry_run_creates_the_cluster_mode_asked_for(stubs: dict[str, str], mode: str, create: str) -> None:
    proc = deploy(stubs, "--dry-run", *DEPLOY_ARGS, "--mode", mode)
    assert proc.returncode == 0, proc.stderr
    cluster = next(c for c in commands(proc.stdout) if c.startswith("gcloud container clusters describe"))
    assert f"|| {create} " in cluster and "--release-channel stable" in cluster


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        ("--project", [], "no project: pass --project or set PROJECT_ID"),
        ("--region", [], "no region: pass --region or set REGION"),
        ("--allow-cidr", [], "no client range: pass --allow-cidr"),
        (None, ["--allow-cidr", "everyone"], "is not an IPv4 CIDR"),
        (None, ["--mode", "serverless"], "--mode must be autopilot or standard"),
    ],
    ids=["no-project", "no-region", "no-cidr", "bad-cidr", "bad-mode"],
)
def test_dry_run_refuses_missing_or_bad_settings(
    stubs: dict[str, str], drop: str | None, extra: list[str], message: str
) -> None:
    args = list(DEPLOY_ARGS)
    if drop:
        del args[args.index(drop) : args.index(drop) + 2]
    proc = deploy(stubs, "--dry-run", *args, *extra)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == "" and calls(stubs) == []


def test_settings_also_come_from_the_environment(stubs: dict[str, str]) -> None:
    env = {
        **stubs,
        "PROJECT_ID": "env-project",
        "REGION": "us-east1",
        "ALLOW_CIDRS": "10.0.0.0/8,192.0.2.0/24",
    }
    proc = deploy(env, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--project env-project" in proc.stdout and "us-east1-docker.pkg.dev" in proc.stdout
    assert 'value: ["10.0.0.0/8", "192.0.2.0/24"]' in printed_kustomization(proc.stdout)


def test_dry_run_with_an_image_skips_build_and_push(stubs: dict[str, str]) -> None:
    proc = deploy(stubs, "--dry-run", *DEPLOY_ARGS, "--image", f"{REGISTRY_IMAGE}@sha256:{'a' * 64}")
    assert proc.returncode == 0, proc.stderr
    assert not any(c.startswith(("scripts/build_image.sh", "docker push")) for c in commands(proc.stdout))
    kustomization = yaml.safe_load(printed_kustomization(proc.stdout))
    assert kustomization["images"] == [
        {"name": "fashion-mnist-serve", "newName": REGISTRY_IMAGE, "digest": f"sha256:{'a' * 64}"}
    ]


def test_deploy_creates_what_is_missing_without_printing_the_token(stubs: dict[str, str]) -> None:
    proc = deploy({**stubs, "STUB_GCP": "missing"}, *DEPLOY_ARGS, "--image", f"{REGISTRY_IMAGE}:v7")
    assert proc.returncode == 0, proc.stderr
    made = [c for c in calls(stubs) if " create" in c]
    assert [c.split(" --")[0] for c in made] == [
        "gcloud artifacts repositories create fashion-mnist",
        "gcloud container clusters create-auto fashion-mnist",
        "kubectl -n fashion-mnist create secret generic fashion-mnist-token",
    ]
    token = Path(stubs["STUB_LOG"] + ".token").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert token not in proc.stdout + proc.stderr
    assert "http://203.0.113.10/predictions/fashion_mnist" in proc.stdout


def test_deploy_applies_the_overlay_with_the_image_behind_the_ranges(stubs: dict[str, str]) -> None:
    proc = deploy({**stubs, "STUB_GCP": "existing"}, *DEPLOY_ARGS, "--image", f"{REGISTRY_IMAGE}:v7")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(Path(stubs["STUB_LOG"] + ".applied").read_text()) if d]
    assert {c["image"] for c in containers(docs).values()} == {f"{REGISTRY_IMAGE}:v7"}
    assert find(docs, "Service")["spec"]["loadBalancerSourceRanges"] == ["203.0.113.7/32"]
    proc = validate(core_objects(docs), GKE_STABLE[-1])
    assert proc.returncode == 0, proc.stdout


def test_deploy_keeps_what_exists(stubs: dict[str, str]) -> None:
    proc = deploy({**stubs, "STUB_GCP": "existing"}, *DEPLOY_ARGS, "--image", "registry.example/fm:1")
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls(stubs) if " create" in c]
    assert "kubectl apply -k" in "\n".join(calls(stubs))


@pytest.fixture(scope="module")
def cloudbuild() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cloudbuild.yaml").read_text(encoding="utf-8"))


def substitute(value: str, cloudbuild: dict[str, Any]) -> str:
    """Cloud Build's ${VAR} substitution, with PROJECT_ID and BUILD_ID made up."""
    values = {"PROJECT_ID": "demo-project", "BUILD_ID": "b-1", **cloudbuild["substitutions"]}
    values["_ALLOW_CIDRS"] = "203.0.113.7/32"
    for _ in range(3):  # _IMAGE refers to other substitutions
        value = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return value


def test_cloudbuild_pushes_and_deploys_the_image_it_builds(cloudbuild: dict[str, Any]) -> None:
    steps = {step["id"]: step for step in cloudbuild["steps"]}
    built = steps["build"]["args"][steps["build"]["args"].index("--tag") + 1]
    deployed = steps["deploy"]["args"][steps["deploy"]["args"].index("--image") + 1]
    assert built == steps["push"]["args"][1] == deployed == cloudbuild["images"][0]
    assert list(steps) == ["repository", "build", "push", "deploy"]


def test_cloudbuild_deploy_step_is_a_valid_deploy(cloudbuild: dict[str, Any], stubs: dict[str, str]) -> None:
    step = next(step for step in cloudbuild["steps"] if step["id"] == "deploy")
    assert step["args"][0] == "scripts/deploy_gke.sh"
    env = dict(item.split("=", 1) for item in step["env"])
    env = {name: substitute(value, cloudbuild) for name, value in env.items()}
    proc = deploy({**stubs, **env}, "--dry-run", *(substitute(a, cloudbuild) for a in step["args"][1:]))
    assert proc.returncode == 0, proc.stderr
    assert (
        "Deployed us-central1-docker.pkg.dev/demo-project/fashion-mnist/fashion-mnist-serve:b-1"
        in proc.stdout
    )


# --- the pod, run with Docker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod(gke: list[dict[str, Any]], mar_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    secrets = {"fashion-mnist-token": {"tokens": "0" * 64 + "\n"}}
    pod = Pod.run(gke, build_image(IMAGE, mar=mar_file), tmp_path_factory.mktemp("pod"), secrets)
    try:
        pod.wait_ready()
        yield pod
    finally:
        pod.remove()


@pytest.mark.container
@pytest.mark.parametrize("kind", ["startupProbe", "readinessProbe", "livenessProbe"])
@pytest.mark.parametrize("name", ["torchserve", "proxy"])
def test_manifest_probes_pass_on_the_running_pod(pod: Pod, name: str, kind: str) -> None:
    assert pod.probe(name, kind)


@pytest.mark.container
def test_readiness_follows_torchserve(pod: Pod) -> None:
    """The proxy's readiness path goes through to TorchServe: with TorchServe down it fails,
    while the proxy's liveness still passes (no restart of a healthy proxy)."""
    torchserve = pod.containers["torchserve"]
    torchserve.stop(30)
    try:
        assert not pod.probe("proxy", "readinessProbe")
        assert pod.probe("proxy", "livenessProbe")
    finally:
        # As the kubelet would: restart the container, so the pod is whole for the other tests.
        torchserve.start()
        pod.wait_ready()


@pytest.mark.container
def test_pod_deletion_drains_cleanly(
    gke: list[dict[str, Any]], mar_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Requests through the proxy keep succeeding until the proxy stops listening (TorchServe
    outlives it), and every container exits 0 inside terminationGracePeriodSeconds."""
    secrets = {"fashion-mnist-token": {"tokens": "1" * 64 + "\n"}}
    pod = Pod.run(gke, build_image(IMAGE, mar=mar_file), tmp_path_factory.mktemp("pod"), secrets)
    try:
        pod.wait_ready()
        url = f"http://127.0.0.1:{pod.port('http')}/predictions/fashion_mnist"
        body = png_bytes(np.zeros((28, 28), dtype=np.uint8))
        headers = {"Authorization": f"Bearer {'1' * 64}", "Content-Type": "application/octet-stream"}
        # Ready means TorchServe's /ping, which says Healthy while the worker may still be loading;
        # a loaded machine can take longer than the client's timeout for that first answer.
        wait_for(lambda: http("POST", url, body, headers, timeout=60)[0] == 200, 120, "a first prediction")
        answers: list[int] = []
        done = threading.Event()

        def client() -> None:
            while not done.is_set():
                try:
                    answers.append(http("POST", url, body, headers, timeout=5)[0])
                except OSError:
                    answers.append(0)  # refused or reset: the proxy is gone
                time.sleep(0.05)

        thread = threading.Thread(target=client)
        thread.start()
        try:
            exits = pod.terminate()
        finally:
            done.set()
            thread.join()
        grace = pod.spec["terminationGracePeriodSeconds"]
        for name, (code, seconds) in exits.items():
            assert code == 0 and seconds < grace, (name, code, seconds, pod.containers[name].logs()[-2000:])
        assert exits["torchserve"][1] > exits["proxy"][1]
        served = answers[: answers.index(0)] if 0 in answers else answers
        assert served and set(served) == {200}, answers
    finally:
        pod.remove()
