"""Measured figures in the docs: each benchmark owns a block between two markers in a docs/*.md file
and rewrites only that block, with the exact command that produced it.

    from serving.docblock import command, machine, write_block
    write_block(REPO / "docs" / "serving.md", "bench_serving", f"Measured with `{command(...)}` ...")

The markers are `<!-- NAME:begin -->` and `<!-- NAME:end -->`.
"""

from __future__ import annotations

import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path

from serving.server import InputError


class DocBlockError(InputError):
    """The doc lacks the block's markers; the message says where to add them."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_block(doc: Path, name: str, body: str) -> None:
    """Replace what stands between the markers of block `name` in `doc` by `body`."""
    begin, end = markers(name)
    text = doc.read_text(encoding="utf-8")
    if begin not in text or end not in text.split(begin, 1)[1]:
        raise DocBlockError(f"{doc} lacks the {begin} ... {end} markers: add them where the figures go")
    head, rest = text.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")


def command(program: Sequence[str], argv: Sequence[str]) -> str:
    """The command line to quote next to the figures: `program` (e.g. python -m scripts.soak) + argv."""
    return shlex.join([*program, *argv])


def machine() -> str:
    """Cores, CPU model and load: what the figures depend on, for the line above them."""
    cpus = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpus.read_text().splitlines() if cpus.is_file() else [])
        if line.startswith("model name")
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = names[0] if names else platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU; load average at start {load}"
