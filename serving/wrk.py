"""Closed-loop HTTP/1.1 keep-alive load from `wrk` (Debian package `wrk`), as a typed result.

    from serving import wrk
    result = wrk.run(url, {"Authorization": "Bearer KEY"}, png, connections=16, seconds=10)
    result.rps, result.p50, result.p99, result.errors      # req/s, ms, ms, non-2xx + socket errors

The benchmarks measure every server (the project's, its peers') with this one load generator:
wrk keeps each connection open (HTTP/1.1), so a server is not charged for connection setup, and
it is written in C, so on a small machine it takes less CPU from the server than a Python client.
The POST body and headers travel in a generated Lua script; `--latency` adds the percentiles,
which `parse` reads from wrk's report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.server import InputError, ServeError

INSTALL_HINT = "install it with `apt-get install wrk` (or `scripts/setup.sh --dev`)"
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles in ms, and what went wrong.

    non_2xx counts answers with a status >= 400 (wrk's "Non-2xx or 3xx responses"); socket_errors
    counts connect, read and write errors and timeouts. Latencies include errors' latencies.
    """

    connections: int
    seconds: float
    requests: int
    rps: float
    p50: float
    p75: float
    p90: float
    p99: float
    non_2xx: int = 0
    socket_errors: int = 0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def ok_rps(self) -> float:
        """Answers below 400 per second: under overload a server that refuses fast (503 for a full
        queue) shows a high `rps` that is mostly refusals."""
        return self.rps * (self.requests - self.non_2xx) / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, float]:
        return asdict(self) | {"errors": self.errors}


def parse(report: str, connections: int) -> WrkResult:
    """wrk's `--latency` report -> WrkResult. Raises ServeError when a figure is missing (wrk could
    not connect, or printed something this parser does not know)."""

    def need(pattern: str) -> re.Match[str]:
        found = re.search(pattern, report)
        if found is None:
            raise ServeError(f"wrk's report has no {pattern!r}; its output:\n{report[-1500:]}")
        return found

    percentiles = {
        p: float(m.group(1)) * UNIT_MS[m.group(2)]
        for p in (50, 75, 90, 99)
        for m in [need(rf"\n\s*{p}%\s+{_DURATION}\s*\n")]
    }
    done = need(rf"(\d+) requests in {_DURATION}")
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    return WrkResult(
        connections=connections,
        seconds=float(done.group(2)) * UNIT_MS[done.group(3)] / 1e3,
        requests=int(done.group(1)),
        rps=float(need(r"Requests/sec:\s+([\d.]+)").group(1)),
        p50=percentiles[50],
        p75=percentiles[75],
        p90=percentiles[90],
        p99=percentiles[99],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def lua_string(text: str) -> str:
    """`text` as a Lua string literal (quotes, backslashes and control characters escaped)."""
    escaped = "".join(c if c.isprintable() and c not in '"\\' else f"\\{ord(c):03d}" for c in text)
    return f'"{escaped}"'


def script(body_file: Path, headers: Mapping[str, str], method: str = "POST") -> str:
    """The Lua script that makes every wrk request `method` `body_file`'s bytes with `headers`."""
    lines = [
        f"wrk.method = {lua_string(method)}",
        f'local body = assert(io.open({lua_string(str(body_file))}, "rb"))',
        'wrk.body = body:read("*a")',
        "body:close()",
    ]
    lines += [f"wrk.headers[{lua_string(name)}] = {lua_string(value)}" for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def executable() -> str:
    """The path of wrk, or InputError naming how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise InputError(f"wrk not found on PATH: {INSTALL_HINT}")
    return path


def run(
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    connections: int,
    seconds: float,
    threads: int | None = None,
    timeout_s: float = 10.0,
) -> WrkResult:
    """POST `body` with `headers` to `url` over `connections` keep-alive connections for `seconds`.

    wrk runs `threads` threads (default: one per connection up to the core count; wrk needs at
    least one connection per thread). A request unanswered after `timeout_s` counts as a socket
    error. Raises InputError without wrk, ServeError when wrk fails or completes no request.
    """
    wrk = executable()
    if connections < 1 or seconds <= 0:
        raise InputError(f"wrk needs connections >= 1 and seconds > 0, got {connections} and {seconds}")
    threads = min(connections, threads or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="wrk-") as scratch:
        body_file = Path(scratch) / "body"
        body_file.write_bytes(body)
        lua = Path(scratch) / "request.lua"
        lua.write_text(script(body_file, headers), encoding="utf-8")
        command = [
            wrk, "--latency", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
            "--timeout", f"{timeout_s:g}s", "-s", str(lua), url,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout_s + 60)
    report = done.stdout + done.stderr
    if done.returncode != 0:
        raise ServeError(f"wrk failed (exit {done.returncode}) against {url}:\n{report[-1500:]}")
    result = parse(report, connections)
    if result.requests == 0:
        raise ServeError(f"wrk completed no request against {url} in {seconds:g}s:\n{report[-1500:]}")
    return result


def version() -> str:
    """wrk's version line, e.g. "wrk debian/4.1.0-3+b2 [epoll]"."""
    out = subprocess.run([executable(), "--version"], capture_output=True, text=True)
    first = (out.stdout + out.stderr).strip().splitlines()
    return " ".join(first[0].split()[:3]) if first else "wrk (unknown version)"
