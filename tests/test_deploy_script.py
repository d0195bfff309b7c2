"""scripts/deploy_gke.sh and cloudbuild.yaml, exercised with stand-ins for gcloud, kubectl and
docker (GCP is the one thing mocked; the stand-in kubectl renders with the real one).

    python -m pytest tests/test_deploy_script.py
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from checks.manifests import GKE_STABLE, core_objects, validate
from serving import REPO
from tests import gcp_stubs
from tests.containers import deployment_containers, find
from tests.gcp_stubs import calls

CASES = (
    gcp_stubs.APPLY_CASE
    + r"""*" describe "* | *"get secret"*) [ "$STUB_GCP" = existing ] ;;
*"get service"*) echo 203.0.113.10 ;;
*"create secret"*)
    for arg in "$@"; do
        case "$arg" in --from-file=tokens=*) cat "${arg#--from-file=tokens=}" >"$STUB_LOG.token" ;; esac
    done
    ;;
"""
)
DEPLOY_ARGS = ["--project", "demo-project", "--region", "europe-west4", "--allow-cidr", "203.0.113.7/32"]
REGISTRY_IMAGE = "europe-west4-docker.pkg.dev/demo-project/fashion-mnist/fashion-mnist-serve"


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    """Environment with gcloud, kubectl and docker replaced by recording stand-ins."""
    return gcp_stubs.stub_env(tmp_path, CASES, unset={"PROJECT_ID", "REGION", "ALLOW_CIDRS"})


def deploy(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "deploy_gke.sh"
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=60)


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
    assert {c["image"] for c in deployment_containers(docs).values()} == {f"{REGISTRY_IMAGE}:v7"}
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
