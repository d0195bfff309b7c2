"""The checks themselves: every pre-commit hook rejects what it is there to reject, the workflows'
run-script checker reports true lines, and the two GitHub workflows keep their promises.

    python -m pytest tests/test_ci.py

`make lint` shows that the real tree passes every hook; here each hook runs, with the real tools,
over a scratch git repository holding one broken file per hook, so a hook that can never fail
(a wrong `files:` pattern, a tool that is not called) fails this test. docs/ci.md says what runs
where.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from checks import workflow_scripts
from checks.workflow_scripts import Script, scripts, shellcheck
from tests.conftest import SHARED_ENV
from tests.test_container import RUNTIME_IMAGE, TRAIN_IMAGE

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
PRIVATE_KEY_HEADER = "-----BEGIN " + "RSA PRIVATE KEY-----"  # split, so this file trips no hook
BAD_RUN = """on: push
jobs:
  check:
    runs-on: ubuntu-24.04
    steps:
      - run: |
          echo "${{ github.sha }}"
          rm -rf $1/build
"""
# One broken file per hook, and what the hook's report must name.
BROKEN: dict[str, tuple[str, str | bytes, str]] = {
    "trailing-whitespace": ("notes.txt", "spaces after this  \n", "notes.txt"),
    "end-of-file-fixer": ("no_newline.txt", "no newline at the end", "no_newline.txt"),
    "check-added-large-files": ("weights.bin", b"\0" * 600 * 1024, "weights.bin"),
    "check-yaml": ("broken.yaml", "key: [1, 2\n", "broken.yaml"),
    "check-json": ("broken.json", '{"a": 1,}\n', "broken.json"),
    "check-toml": ("broken.toml", "key = \n", "broken.toml"),
    "detect-private-key": ("id.txt", f"{PRIVATE_KEY_HEADER}\nMIIB\n", "id.txt"),
    "no-key-files": ("serve/key_file.json", "{}\n", "key_file.json"),
    "no-torchserve-keys": (
        "tokens.json",
        '{"inference": {"key": "k", "expiration time": "2026-01-01T00:00:00Z"}}\n',
        "tokens.json",
    ),
    "ruff": ("lint_me.py", "print(undefined_name)\n", "F821"),
    "ruff-format": ("format_me.py", "x=[1,2]\n", "reformatted"),
    "shellcheck": ("run.sh", "#!/bin/bash\nrm -rf $1/build\n", "SC2086"),
    "hadolint": ("Dockerfile", "FROM debian\nRUN echo hi\n", "DL3006"),
    "github-workflows-schema": (
        ".github/workflows/schema.yml",
        "on: push\njobs:\n  a:\n    steps: []\n",
        "schema.yml",
    ),
    "actionlint": (".github/workflows/schema.yml", None, "schema.yml"),
    "shellcheck-workflows": (".github/workflows/run.yml", BAD_RUN, "run.yml:8:"),
}
STATUS = re.compile(r"^(?P<name>.+?)\.{3,}(\(no files to check\))?(?P<status>Passed|Failed|Skipped)$")


def hook_reports(output: str) -> dict[str, tuple[str, str]]:
    """pre-commit's output as {hook id: (status, report)}."""
    reports: dict[str, tuple[str, str]] = {}
    status, lines = "", []
    for line in [*output.splitlines(), "end...Passed"]:  # a last status line closes the last report
        match = STATUS.match(line)
        if match:
            ids = [x.removeprefix("- hook id: ") for x in lines if x.startswith("- hook id: ")]
            if status and ids:
                reports[ids[0]] = (status, "\n".join(lines))
            status, lines = match["status"], []
        else:
            lines.append(line)
    return reports


@pytest.fixture(scope="module")
def broken_repo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """`pre-commit run --all-files` over a scratch repository of broken files, with this
    project's config and tools (.venv, node_modules and checks/ linked in, not committed)."""
    root = tmp_path_factory.mktemp("hooks")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    shutil.copy(REPO / ".pre-commit-config.yaml", root)
    for tool in (".venv", "node_modules", "checks"):
        (root / tool).symlink_to(REPO / tool)
    (root / ".git" / "info" / "exclude").write_text(".venv\nnode_modules\nchecks\n")
    for name, content, _ in BROKEN.values():
        if content is None:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path_factory.mktemp("pre-commit-home"))}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("pre-commit")), "run", "--all-files", "--color=never"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return hook_reports(proc.stdout)


def test_every_hook_is_exercised() -> None:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text(encoding="utf-8"))
    hooks = {hook["id"] for repo in config["repos"] for hook in repo["hooks"]}
    # kubernetes-manifests checks this checkout's deploy/; tests/test_deploy_manifests.py breaks its gates.
    assert hooks - {"kubernetes-manifests"} == set(BROKEN)
    assert all(repo["repo"] == "local" for repo in config["repos"]), "a remote hook needs the network"


@pytest.mark.parametrize("hook", BROKEN)
def test_hook_rejects_a_broken_file(broken_repo_run: dict[str, tuple[str, str]], hook: str) -> None:
    status, report = broken_repo_run.get(hook, ("missing", ""))
    assert status == "Failed", f"{hook}: {status}\n{report}"
    assert BROKEN[hook][2] in report, report


# --- checks/workflow_scripts.py -------------------------------------------------------------


def workflow(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wf.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_findings_point_at_the_workflow_line(tmp_path: Path) -> None:
    findings = [f for s in scripts(workflow(tmp_path, BAD_RUN)) for f in shellcheck(s)]
    assert len(findings) == 1, findings
    # Line 8 of BAD_RUN is `          rm -rf $1/build`: `$1` starts in column 18.
    assert findings[0].startswith(f"{tmp_path / 'wf.yml'}:8:18: info SC2086:"), findings


def test_one_line_run_counts_from_its_own_line(tmp_path: Path) -> None:
    text = "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: echo $1\n"
    (finding,) = [f for s in scripts(workflow(tmp_path, text)) for f in shellcheck(s)]
    assert ":6:19: info SC2086" in finding, finding  # `$1` starts in column 19


def test_expressions_are_not_shell(tmp_path: Path) -> None:
    text = 'on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: echo "${{ github.ref }}"\n'
    (script,) = scripts(workflow(tmp_path, text))
    assert script.text == 'echo "' + "_" * len("${{ github.ref }}") + '"'
    assert shellcheck(script) == []


@pytest.mark.parametrize(
    ("defaults", "step_shell", "expected"),
    [
        ("", "", ["bash"]),
        ("", "shell: sh", ["sh"]),
        ("defaults:\n  run:\n    shell: sh\n", "", ["sh"]),
        ("defaults:\n  run:\n    shell: sh\n", "shell: bash -e {0}", ["bash"]),
        ("", "shell: pwsh", []),
        ("", "shell: python", []),
    ],
    ids=[
        "default-bash",
        "step-sh",
        "workflow-default",
        "step-over-default",
        "pwsh-skipped",
        "python-skipped",
    ],
)
def test_scripts_run_in_the_step_shell(
    tmp_path: Path, defaults: str, step_shell: str, expected: list[str]
) -> None:
    step = "      - run: echo hi\n" + (f"        {step_shell}\n" if step_shell else "")
    text = f"on: push\n{defaults}jobs:\n  a:\n    runs-on: x\n    steps:\n{step}"
    assert [s.shell for s in scripts(workflow(tmp_path, text))] == expected


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = workflow(tmp_path, "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: echo hi\n")
    assert workflow_scripts.main([str(clean)]) == 0
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_RUN, encoding="utf-8")
    assert workflow_scripts.main([str(bad)]) == 1
    assert "SC2086" in capsys.readouterr().out
    bad.write_text("jobs: [unclosed\n", encoding="utf-8")
    assert workflow_scripts.main([str(bad)]) == 1
    assert "not valid YAML" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        workflow_scripts.main([str(tmp_path / "missing.yml")])
    assert exit_info.value.code == 2


def test_shellcheck_runs_on_unusual_scripts() -> None:
    """An empty script or one of only comments is clean, not an error."""
    assert shellcheck(Script(Path("wf.yml"), 1, "bash", "")) == []
    assert shellcheck(Script(Path("wf.yml"), 1, "sh", "# nothing to do\n")) == []


# --- the workflows ------------------------------------------------------------------------------


def vars_expression(value: str, variables: dict[str, str]) -> str:
    """`${{ vars.NAME }}` or `${{ vars.NAME || 'default' }}` as GitHub evaluates it."""
    match = re.fullmatch(r"\$\{\{ vars\.(\w+)(?: \|\| '([^']*)')? \}\}", value)
    assert match, f"{value!r}: the job's env takes repository variables only"
    return variables.get(match[1], match[2] or "")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def steps(flow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in flow["jobs"].values() for step in job["steps"]]


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_every_action_is_pinned_to_a_commit(name: str) -> None:
    lines = [line for line in (WORKFLOWS / name).read_text(encoding="utf-8").splitlines() if "uses:" in line]
    assert lines
    for line in lines:
        assert re.search(r"uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*$", line), line


def test_ci_runs_the_readme_test_command_on_pushes_and_pull_requests() -> None:
    flow = load("ci.yml")
    assert {"push", "pull_request"} <= set(flow[True])  # YAML 1.1 reads the key `on` as True
    assert any(".ci/run" in step.get("run", "") for step in steps(flow))
    assert (REPO / ".ci" / "run").read_text(encoding="utf-8").rstrip().endswith("make test")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "`.ci/run` runs exactly `make test`" in readme


def test_ci_caches_pip_and_uploads_coverage() -> None:
    flow = load("ci.yml")
    python = next(s for s in steps(flow) if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["cache"] == "pip"
    upload = next(s for s in steps(flow) if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"
    assert {"coverage.xml", "reports/"} <= set(upload["with"]["path"].split())
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "--cov-report=xml" in makefile, "the workflow uploads coverage.xml: make test must write it"


def test_make_test_runs_the_parallel_then_the_solo_tests_with_one_coverage() -> None:
    """docs/ci.md: the parallel phase, then the `solo` tests; the second appends to the first's
    coverage, so the floor, the report and coverage.xml are those of the whole suite."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    recipe = makefile.split("\ntest: ", 1)[1].split("\n\n", 1)[0]
    # Setup builds the container tests' images beside the venv install (docs/ci.md).
    assert recipe.splitlines()[1].strip() == "scripts/setup.sh --dev --images", recipe
    # Each phase's arguments: what follows "-m pytest" on its line.
    parallel, solo = [
        words[words.index("pytest") + 1 :]
        for words in (line.split() for line in recipe.splitlines())
        if "pytest" in words
    ]
    assert parallel[:4] == ["-m", '"not', 'solo"', "-n"] and "--dist" in parallel, parallel
    assert solo[:2] == ["-m", "solo"] and "-n" not in solo, solo
    for phase in (parallel, solo):
        assert "--basetemp" in phase, "xdist's popen-gwN/ makes pytest's default base temp too long"
    # Both phases read the fixtures build_once made in one directory (tests/conftest.py).
    shared = [line for line in recipe.splitlines() if "pytest" in line.split()]
    assert all(f"{SHARED_ENV}=$(TEST_SHARED) " in line for line in shared), shared
    for phase in (parallel, solo):
        assert {"--durations=25", "$(COV)"} <= set(phase), phase
    assert {"--cov-append", "--cov-report=xml", "--cov-fail-under=85"} <= set(solo), solo
    assert not {"--cov-append", "--cov-report=xml"} & set(parallel) and "--cov-report=" in parallel


def test_setup_builds_the_images_under_the_container_tests_tags() -> None:
    """Tagged otherwise, setup's builds would still fill the layer cache, but leave two more images."""
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    for image in (RUNTIME_IMAGE, TRAIN_IMAGE):
        tag = image.replace(":test", ":$tag", 1)
        assert f'--tag "{tag}"' in setup, image
    assert "tag=${FASHION_TEST_TAG:-test}" in setup  # as tests/containers.build_image renames them


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images"], "--images needs --dev"),
        (["--dve"], "unknown argument '--dve'; use --dev, or --dev --images"),
    ],
)
def test_setup_refuses_bad_arguments_before_installing_anything(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [str(REPO / "scripts" / "setup.sh"), *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == "", "nothing may start before the arguments are checked"


def test_release_authenticates_by_workload_identity_federation() -> None:
    flow = load("release.yml")
    assert flow["permissions"]["id-token"] == "write"
    auth = next(s for s in steps(flow) if s.get("uses", "").startswith("google-github-actions/auth@"))
    assert {"workload_identity_provider", "service_account"} == set(auth["with"])
    text = (WORKFLOWS / "release.yml").read_text(encoding="utf-8")
    assert "credentials_json" not in text and "secrets." not in text


def test_release_runs_on_tags_and_deploys_with_deploy_gke() -> None:
    """The deploy step's command, run with --dry-run, is a valid deploy of the pushed image."""
    flow = load("release.yml")
    assert list(flow[True]) == ["push"] and flow[True]["push"]["tags"]
    (deploy,) = [s for s in steps(flow) if "scripts/deploy_gke.sh" in s.get("run", "")]
    assert deploy["run"].startswith("scripts/deploy_gke.sh ")
    image = "europe-west4-docker.pkg.dev/demo/fashion-mnist/fashion-mnist-serve@sha256:" + "a" * 64
    job_env = next(iter(flow["jobs"].values()))["env"]
    variables = {"GCP_PROJECT_ID": "demo", "GCP_REGION": "europe-west4", "ALLOW_CIDRS": "203.0.113.7/32"}
    env = {name: vars_expression(value, variables) for name, value in job_env.items()}
    env = {**os.environ, **env, "IMAGE": image}
    proc = subprocess.run(
        ["bash", "-c", deploy["run"] + " --dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Deployed {image}" in proc.stdout
    assert "docker push" not in proc.stdout, "the image is pushed before the deploy step"
