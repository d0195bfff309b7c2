"""Recording stand-ins for gcloud, kubectl and docker, for the tests of the GCP scripts
(scripts/deploy_gke.sh, scripts/train_gcp.sh). GCP is the one thing the tests mock.

Each stand-in appends its command line to $STUB_LOG. Without STUB_GCP in the environment it fails
(exit 97), so a dry run that runs anything is caught; with STUB_GCP=new or =existing it answers
the calls a test names in `cases` (shell `case "$*" in` branches), as a new or an existing project.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

_HEAD = """#!/bin/sh
echo "{tool} $*" >>"$STUB_LOG"
[ -n "$STUB_GCP" ] || exit 97
case "$*" in
"""
# What would be applied: the real kubectl renders the kustomization directory.
APPLY_CASE = '"apply -k "*) "$STUB_KUBECTL" kustomize "$3" >"$STUB_LOG.applied" ;;\n'


def stub_env(tmp_path: Path, cases: str, unset: Iterable[str]) -> dict[str, str]:
    """The environment for a script under test: stand-ins first on PATH, `unset` variables removed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "kubectl", "docker"):
        (bin_dir / tool).write_text(_HEAD.format(tool=tool) + cases + "esac\n")
        (bin_dir / tool).chmod(0o755)
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: install it (docs/deploy.md, prerequisites)"
    dropped = {*unset, "STUB_GCP"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    log = str(tmp_path / "calls.log")
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "STUB_LOG": log, "STUB_KUBECTL": kubectl}


def calls(env: dict[str, str]) -> list[str]:
    """The stand-ins' calls so far, one command line each."""
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []
