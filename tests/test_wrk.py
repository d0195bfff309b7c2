"""serving.wrk: wrk's report parsed into figures, and a real wrk run against a real local HTTP/1.1
server that checks every request's method, headers and body; serving.bench.warm_up's client count.

    python -m pytest tests/test_wrk.py -q
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving import bench, wrk
from serving.properties import parse_properties
from serving.server import InputError, ServeError
from serving.tsconfig import render

REPORT = """Running 1s test @ http://127.0.0.1:18777/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.47ms    5.23ms  50.65ms   91.97%
    Req/Sec     1.69k   611.64     2.76k    70.00%
  Latency Distribution
     50%  593.00us
     75%    2.12ms
     90%    6.00ms
     99%    1.03s
  1689 requests in 1.00s, 0.89MB read
  Socket errors: connect 0, read 2, write 1, timeout 4
  Non-2xx or 3xx responses: 17
Requests/sec:   1685.90
Transfer/sec:      0.89MB
"""
BODY = bytes(range(256)) * 4  # every byte value: the Lua script must pass binary bodies through
TOKEN = 'k"ey\\1'  # quotes and backslashes: the Lua string escaping is exercised


def test_parse_reads_every_figure_in_ms() -> None:
    result = wrk.parse(REPORT, connections=2)
    assert (result.requests, result.rps, result.seconds) == (1689, 1685.90, 1.0)
    assert (result.p50, result.p75, result.p90, result.p99) == pytest.approx((0.593, 2.12, 6.0, 1030.0))
    assert (result.non_2xx, result.socket_errors, result.errors) == (17, 7, 24)


def test_parse_without_errors_lines_counts_none() -> None:
    clean = "\n".join(line for line in REPORT.splitlines() if "errors" not in line and "Non-2xx" not in line)
    assert wrk.parse(clean + "\n", 2).errors == 0


def test_parse_of_a_failed_run_names_the_missing_figure() -> None:
    with pytest.raises(ServeError, match="unable to connect"):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused\n", 1)


class Checker(BaseHTTPRequestHandler):
    """200 for a POST with the expected body and Authorization header, 401 otherwise."""

    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = body == BODY and self.headers["Authorization"] == f"Bearer {TOKEN}"
        answer = b'{"ok": true}' if ok else b'{"error": "unauthorized"}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:  # a line per request would flood the test output
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """wrk resets its connections when its time is up; that is no error of the test's."""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    httpd = Server(("127.0.0.1", 0), Checker)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/predict"
    httpd.shutdown()
    httpd.server_close()


def test_real_run_sends_body_and_headers(url: str) -> None:
    result = wrk.run(url, {"Authorization": f"Bearer {TOKEN}"}, BODY, connections=2, seconds=1)
    assert result.requests > 0 and result.rps > 0, result
    assert result.errors == 0, f"the server refused wrk's requests: {result}"
    assert 0 < result.p50 <= result.p90 <= result.p99


def test_real_run_counts_refused_requests(url: str) -> None:
    result = wrk.run(url, {"Authorization": "Bearer wrong"}, BODY, connections=1, seconds=1)
    assert result.requests > 0 and result.non_2xx == result.requests and result.ok_rps == 0


def test_missing_wrk_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="apt-get install wrk"):
        wrk.run("http://127.0.0.1:1/", {}, b"", connections=1, seconds=1)


def test_warm_up_uses_the_most_clients_up_to_the_job_queue(url: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    queue = int(parse_properties(render("local"))["job_queue_size"])
    capped = bench.warm_up(url, headers, BODY, [1, 4 * queue], seconds=1)
    assert (capped.connections, capped.errors) == (queue, 0), capped
    below = bench.warm_up(url, headers, BODY, [3, 1], seconds=1)
    assert (below.connections, below.errors) == (3, 0), below
