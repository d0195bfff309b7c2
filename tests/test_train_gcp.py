"""Multi-node training on GCP, checked without GCP: the GKE Job, the Vertex AI CustomJob and
scripts/train_gcp.sh.

    python -m pytest tests/test_train_gcp.py -q

`python -m checks.manifests` (a pre-commit hook) validates deploy/training with
`kubernetes-validate --strict` and deploy/vertex/customjob.yaml against the schema written from
Vertex AI's REST reference; here: the Job's objects agree on the rendezvous (pod 0 behind the
headless Service), the spec as the script fills it in passes the schema and the schema rejects
mistakes, and the training arguments of both compose as Hydra overrides. scripts/train_gcp.sh runs with
recording stand-ins for gcloud, kubectl and docker: GCP is the one thing mocked.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from checks.manifests import GKE_STABLE, TRAINING, render, validate, vertex_schema
from tests import gcp_stubs
from tests.containers import REPO, find
from tests.gcp_stubs import calls

SCRIPT = REPO / "scripts" / "train_gcp.sh"
ARGS = ["--project", "demo-project", "--region", "europe-west4", "--bucket", "demo-fm", "--run-id", "r1"]
REGISTRY_IMAGE = "europe-west4-docker.pkg.dev/demo-project/fashion-mnist/fashion-mnist-train"
# Values the placeholders in the manifests' arguments take at run time (Kubernetes expands $(VAR),
# the shell $VAR and $(nproc)), to compose the arguments as the training process will see them.
RUNTIME = {"$(NNODES)": "2", "$(NODE_RANK)": "0", "$(RUN_ID)": "r1", "$WORLD_SIZE": "2", "$RANK": "0",
           "$(nproc)": "4"}  # fmt: skip

CASES = (
    gcp_stubs.APPLY_CASE
    + r""""projects describe "*) echo 123456789 ;;
*" describe "*) [ "$STUB_GCP" = existing ] ;;
"ai custom-jobs create "*)
    for arg in "$@"; do [ "$prev" = --config ] && cp "$arg" "$STUB_LOG.spec"; prev=$arg; done ;;
"""
)


@pytest.fixture(scope="module")
def job_docs() -> list[dict[str, Any]]:
    return render(TRAINING)


@pytest.fixture(scope="module")
def spec_schema() -> dict[str, Any]:
    return vertex_schema()


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    env = gcp_stubs.stub_env(tmp_path, CASES, unset={"PROJECT_ID", "REGION", "BUCKET"})
    # Stand-in raw files: the script only checks that the four are there before uploading them.
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (raw / f"{name}-ubyte.gz").write_bytes(b"")
    return {**env, "RAW": str(raw)}


def train_gcp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(SCRIPT), *args, "--raw-dir", env["RAW"]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def printed_commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def trainer(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Job")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def config_overrides(args: list[str]) -> list[str]:
    """The training.train overrides of a torchrun command line, run-time values filled in, less
    Hydra's own settings (hydra.run.dir), which compose() does not take."""
    filled = []
    for arg in args[args.index("training.train") + 1 :]:
        for placeholder, value in RUNTIME.items():
            arg = arg.replace(placeholder, value)
        filled.append(arg)
    return [arg for arg in filled if not arg.startswith("hydra.")]


def torchrun_flags(args: list[str]) -> dict[str, str]:
    head = args[: args.index("training.train")]
    return dict(a[2:].split("=", 1) for a in head if a.startswith("--") and "=" in a)


# --- the GKE Job --------------------------------------------------------------------------------


def test_training_kustomization_renders_job_service_and_identity(job_docs) -> None:
    assert sorted(d["kind"] for d in job_docs) == ["Job", "Namespace", "Service", "ServiceAccount"]


def test_every_pod_runs_at_once_and_knows_its_node(job_docs) -> None:
    job = find(job_docs, "Job")
    spec, env = job["spec"], env_of(trainer(job_docs))
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]) >= 2
    index = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["NODE_RANK"] == index
    flags = torchrun_flags(trainer(job_docs)["args"])
    assert (flags["nnodes"], flags["node-rank"]) == ("$(NNODES)", "$(NODE_RANK)")
    assert "trainer.num_nodes=$(NNODES)" in trainer(job_docs)["args"]


def test_rendezvous_is_pod_zero_behind_the_headless_service(job_docs) -> None:
    job, service = find(job_docs, "Job"), find(job_docs, "Service")
    pod = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    flags = torchrun_flags(trainer(job_docs)["args"])
    # Indexed Job pods are named <job>-<index>: the rendezvous host is the pod with index 0.
    assert flags["master-addr"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    ports = {p["name"]: p["containerPort"] for p in trainer(job_docs)["ports"]}
    assert int(flags["master-port"]) == service["spec"]["ports"][0]["port"] == ports["rendezvous"]


def test_trainer_is_hardened_and_sized(job_docs) -> None:
    pod = find(job_docs, "Job")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    container = trainer(job_docs)
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]
    threads = next(a for a in container["args"] if a.startswith("trainer.threads="))
    assert threads == f"trainer.threads={container['resources']['requests']['cpu']}"


def test_job_arguments_compose(job_docs, compose_cfg) -> None:
    cfg = compose_cfg(*config_overrides(trainer(job_docs)["args"]))
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 2, 1)
    assert cfg.export_dir.startswith("/bucket/runs/r1/")


# --- the Vertex AI CustomJob --------------------------------------------------------------------


def filled_spec(stubs: dict[str, str], nodes: int = 3) -> dict[str, Any]:
    """deploy/vertex/customjob.yaml as the script fills it in and submits it."""
    image = f"{REGISTRY_IMAGE}:v7"  # a pushed image: no build
    proc = train_gcp(
        {**stubs, "STUB_GCP": "existing"},
        "--target",
        "vertex",
        *ARGS,
        "--nodes",
        str(nodes),
        "--image",
        image,
    )
    assert proc.returncode == 0, proc.stderr
    text = Path(stubs["STUB_LOG"] + ".spec").read_text()
    assert "${" not in text, "a placeholder was left unfilled"
    return yaml.safe_load(text)


def test_vertex_spec_matches_the_documented_schema(stubs, spec_schema) -> None:
    jsonschema.validate(filled_spec(stubs), spec_schema)


def test_vertex_spec_has_one_chief_and_the_other_nodes(stubs) -> None:
    pools = filled_spec(stubs, nodes=5)["workerPoolSpecs"]
    assert [p["replicaCount"] for p in pools] == ["1", "4"]
    assert pools[0]["containerSpec"] == pools[1]["containerSpec"]
    assert pools[0]["containerSpec"]["imageUri"] == f"{REGISTRY_IMAGE}:v7"


def test_vertex_arguments_compose(stubs, compose_cfg) -> None:
    container = filled_spec(stubs)["workerPoolSpecs"][0]["containerSpec"]
    assert container["command"] == ["sh", "-c"]
    words = shlex.split(container["args"][0])
    cfg = compose_cfg(*config_overrides(words))
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.data.source_dir) == (
        "ddp",
        2,
        "/gcs/demo-fm/fashion-mnist/raw",
    )
    assert torchrun_flags(words)["master-addr"] == "$MASTER_ADDR"


@pytest.mark.parametrize(
    "mutation",
    [
        lambda s: s["workerPoolSpecs"][0]["containerSpec"].update(imageUrl="x"),
        lambda s: s["workerPoolSpecs"][0]["containerSpec"].pop("imageUri"),
        lambda s: s["scheduling"].update(timeout="4 hours"),
        lambda s: s["workerPoolSpecs"][1].update(replicaCount="two"),
        lambda s: s["baseOutputDirectory"].update(outputUriPrefix="/gcs/demo-fm"),
    ],
    ids=["unknown-field", "no-image", "bad-duration", "bad-count", "not-a-gcs-uri"],
)
def test_vertex_schema_rejects_mistakes(stubs, spec_schema, mutation) -> None:
    spec = copy.deepcopy(filled_spec(stubs))
    mutation(spec)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(spec, spec_schema)


# --- scripts/train_gcp.sh -----------------------------------------------------------------------


COMMON_STEPS = [
    "gcloud storage buckets describe gs://demo-fm",
    "gcloud storage rsync",
    "gcloud artifacts repositories describe fashion-mnist",
    "gcloud auth configure-docker europe-west4-docker.pkg.dev",
    f"scripts/build_image.sh --train --tag {REGISTRY_IMAGE}:",
    f"docker push {REGISTRY_IMAGE}:",
]
STEPS = {
    "gke": [
        "gcloud services enable container.googleapis.com",
        *COMMON_STEPS,
        "gcloud container clusters describe fashion-mnist",
        "gcloud projects describe demo-project",
        "gcloud storage buckets add-iam-policy-binding gs://demo-fm --member principal://",
        "gcloud container clusters get-credentials fashion-mnist",
        "kubectl -n fashion-mnist-training delete job fashion-mnist-train --ignore-not-found",
        "cat >",
        "kubectl apply -k",
    ],
    "vertex": [
        "gcloud services enable aiplatform.googleapis.com",
        *COMMON_STEPS,
        "gcloud iam service-accounts describe fashion-mnist-train@demo-project.iam.gserviceaccount.com",
        "gcloud storage buckets add-iam-policy-binding gs://demo-fm --member serviceAccount:",
        "cat >",
        "gcloud ai custom-jobs create --region europe-west4 --project demo-project",
    ],
}


@pytest.mark.parametrize("target", sorted(STEPS))
def test_dry_run_prints_every_step_and_runs_nothing(stubs, target: str) -> None:
    proc = train_gcp(stubs, "--dry-run", "--target", target, *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert calls(stubs) == []
    printed = printed_commands(proc.stdout)
    assert len(printed) == len(STEPS[target]), printed
    for command, step in zip(printed, STEPS[target], strict=True):
        assert command.startswith(step), (command, step)
    assert "gs://demo-fm/runs/r1/export/" in proc.stdout


def test_dry_run_with_an_image_skips_build_and_push(stubs) -> None:
    proc = train_gcp(stubs, "--dry-run", "--target", "gke", *ARGS, "--image", "registry.example/t:7")
    assert proc.returncode == 0, proc.stderr
    assert not any(
        c.startswith(("scripts/build_image.sh", "docker push")) for c in printed_commands(proc.stdout)
    )


def test_gke_run_applies_the_job_for_the_nodes_asked_for(stubs, tmp_path: Path) -> None:
    proc = train_gcp({**stubs, "STUB_GCP": "missing"}, "--target", "gke", *ARGS, "--nodes", "4",
                     "--image", f"{REGISTRY_IMAGE}:v7")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    made = [c.split(" --")[0] for c in calls(stubs) if " create" in c]
    assert made == [
        "gcloud storage buckets create gs://demo-fm",
        "gcloud container clusters create-auto fashion-mnist",
    ]
    docs = [d for d in yaml.safe_load_all(Path(stubs["STUB_LOG"] + ".applied").read_text()) if d]
    assert validate(docs, GKE_STABLE[-1]).returncode == 0
    job, env = find(docs, "Job"), env_of(trainer(docs))
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NNODES"]) == 4
    assert env["RUN_ID"] == "r1" and trainer(docs)["image"] == f"{REGISTRY_IMAGE}:v7"
    volume = job["spec"]["template"]["spec"]["volumes"][0]
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "demo-fm"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "gce", *ARGS], "--target must be gke or vertex"),
        (["--target", "gke", *ARGS[2:]], "no project: pass --project or set PROJECT_ID"),
        (["--target", "gke", *ARGS[:4], *ARGS[6:]], "no bucket: pass --bucket or set BUCKET"),
        (["--target", "gke", *ARGS, "--bucket", "Demo Bucket"], "is not a bucket name"),
        (["--target", "vertex", *ARGS, "--nodes", "1"], "--nodes must be a whole number of at least 2"),
        (["--target", "vertex", *ARGS, "--nodes", "many"], "--nodes must be a whole number of at least 2"),
        (["--target", "gke", *ARGS, "--run-id", "a/b"], "may hold only lower-case letters"),
    ],
    ids=["bad-target", "no-project", "no-bucket", "bad-bucket", "one-node", "bad-nodes", "bad-run-id"],
)
def test_bad_settings_are_refused_before_anything_runs(stubs, args: list[str], message: str) -> None:
    proc = train_gcp(stubs, "--dry-run", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == "" and calls(stubs) == []


def test_missing_raw_files_name_the_fix(stubs, tmp_path: Path) -> None:
    proc = train_gcp({**stubs, "RAW": str(tmp_path / "empty")}, "--dry-run", "--target", "gke", *ARGS)
    assert proc.returncode == 2
    assert re.search(r"train-images-idx3-ubyte\.gz not found: pass --raw-dir", proc.stderr)
