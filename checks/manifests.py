"""Render every kustomization under deploy/ and validate the result offline, without a cluster.

    .venv/bin/python -m checks.manifests     # exit 0 when all passes, 1 naming each problem

- `kubectl kustomize` renders deploy/base, deploy/overlays/gke and deploy/training (the GKE training Job);
- `kubernetes-validate --strict` checks every rendered object, and deploy/token-secret.template.yaml,
  against the Kubernetes minor versions GKE's stable channel offers (docs/deploy.md says why these);
- the PodMonitoring, a CRD kubernetes-validate has no schema for, must match
  deploy/schemas/podmonitoring-v1.json;
- the Vertex AI training job, deploy/vertex/customjob.yaml with example values in its placeholders,
  must match deploy/schemas/vertex-customjobspec-v1.json.

The pre-commit hook `kubernetes-manifests` runs this (so `make test` does); tests/test_deploy.py
checks with these same functions that each gate rejects a broken manifest.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# GKE stable channel, checked 2026-11: minor versions 1.34 and 1.35 (1.35 is the default for new
# clusters). scripts/deploy_gke.sh creates clusters on that channel.
GKE_STABLE = ["1.34.0", "1.35.0"]
OVERLAYS = ["base", "overlays/gke"]
TRAINING = "training"
SECRET_TEMPLATE = DEPLOY / "token-secret.template.yaml"
PODMONITORING_SCHEMA = DEPLOY / "schemas" / "podmonitoring-v1.json"
VERTEX_SPEC = DEPLOY / "vertex" / "customjob.yaml"
VERTEX_SCHEMA = DEPLOY / "schemas" / "vertex-customjobspec-v1.json"
# What scripts/train_gcp.sh puts in the spec's ${...} placeholders, by example.
VERTEX_EXAMPLE = {
    "IMAGE": "us-central1-docker.pkg.dev/demo-project/fashion-mnist/fashion-mnist-train:v1",
    "BUCKET": "demo-project-fashion-mnist",
    "RUN_ID": "20261201-120000",
    "WORKERS": "1",
    "MACHINE_TYPE": "n2-standard-8",
    "SERVICE_ACCOUNT": "fashion-mnist-train@demo-project.iam.gserviceaccount.com",
}


def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/<overlay>` as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found: install it (docs/deploy.md, prerequisites)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize deploy/{overlay} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def core_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything kubernetes-validate has a schema for (all but the PodMonitoring CRD)."""
    return [d for d in docs if d["kind"] != "PodMonitoring"]


def validate(docs: list[dict[str, Any]], version: str) -> subprocess.CompletedProcess[str]:
    """`kubernetes-validate --strict -k VERSION` over `docs`; its stdout names each resource."""
    # kubernetes-validate is installed next to the interpreter (requirements-dev.txt).
    command = str(Path(sys.executable).with_name("kubernetes-validate"))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "rendered.yaml"
        manifest.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
        cmd = [command, "--strict", "-k", version, str(manifest)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def podmonitoring_schema() -> dict[str, Any]:
    return json.loads(PODMONITORING_SCHEMA.read_text(encoding="utf-8"))


def vertex_schema() -> dict[str, Any]:
    return json.loads(VERTEX_SCHEMA.read_text(encoding="utf-8"))


def vertex_spec(values: dict[str, str] = VERTEX_EXAMPLE) -> dict[str, Any]:
    """deploy/vertex/customjob.yaml with its ${NAME} placeholders filled from `values`.

    Only the braced form is a placeholder: $WORLD_SIZE and the like are for the job's shell."""
    text = VERTEX_SPEC.read_text(encoding="utf-8")
    unknown = set(re.findall(r"\$\{(\w+)\}", text)) - values.keys()
    if unknown:
        raise KeyError(f"{VERTEX_SPEC.name} has placeholders with no value: {sorted(unknown)}")
    return yaml.safe_load(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text))


def problems() -> list[str]:
    """Every way deploy/ fails the checks above; empty when it passes."""
    found: list[str] = []
    rendered: dict[str, list[dict[str, Any]]] = {}
    for overlay in [*OVERLAYS, TRAINING]:
        try:
            rendered[overlay] = render(overlay)
        except RuntimeError as err:
            found.append(str(err))
    secret = yaml.safe_load(SECRET_TEMPLATE.read_text(encoding="utf-8"))
    targets = {f"deploy/{name}": core_objects(docs) for name, docs in rendered.items()}
    targets[str(SECRET_TEMPLATE.relative_to(REPO))] = [secret]
    for version in GKE_STABLE:
        for name, docs in targets.items():
            proc = validate(docs, version)
            if proc.returncode != 0 or proc.stdout.count("passed for resource") != len(docs):
                found.append(
                    f"{name} fails kubernetes-validate --strict -k {version}:\n{proc.stdout}{proc.stderr}"
                )
    schema = podmonitoring_schema()
    for name, docs in rendered.items():
        for monitoring in (d for d in docs if d["kind"] == "PodMonitoring"):
            try:
                jsonschema.validate(monitoring, schema)
            except jsonschema.ValidationError as err:
                found.append(
                    f"deploy/{name}: PodMonitoring breaks {PODMONITORING_SCHEMA.name}: {err.message}"
                )
    try:
        jsonschema.validate(vertex_spec(), vertex_schema())
    except (KeyError, jsonschema.ValidationError) as err:
        message = err.message if isinstance(err, jsonschema.ValidationError) else err.args[0]
        found.append(f"{VERTEX_SPEC.relative_to(REPO)} breaks {VERTEX_SCHEMA.name}: {message}")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(problem, file=sys.stderr)
    if found:
        print(f"manifests: {len(found)} problem(s) in deploy/; fix the manifests above.", file=sys.stderr)
        return 1
    print(
        f"manifests: {', '.join([*OVERLAYS, TRAINING])} render and validate for Kubernetes "
        f"{', '.join(GKE_STABLE)}; {VERTEX_SPEC.relative_to(DEPLOY)} matches its schema"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
