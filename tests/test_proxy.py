"""One credential for every replica: the pod's nginx proxy (deploy/base/proxy/nginx.conf, the file
the manifests mount) in front of a real TorchServe, both run from the built image as the rendered
gke Deployment declares them (tests/containers.py: Pod).

    python -m pytest tests/test_proxy.py
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from checks.manifests import render
from serving.images import encode as png_bytes
from tests.containers import Container, Pod, build_image, hardened_flags, http

IMAGE = "fashion-mnist-serve:test"
TOKEN = secrets.token_hex(32)
NEXT_TOKEN = secrets.token_hex(32)
# Every character a token may have; `.` and `+` mean something in the proxy's regex map.
SYMBOLS_TOKEN = "a.b+c~/=-" + secrets.token_hex(16)
PNG = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def pod(mar_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The pod with a Secret holding three tokens (the rotation case), ready."""
    tokens = {"fashion-mnist-token": {"tokens": f"{TOKEN}\n{NEXT_TOKEN}\n{SYMBOLS_TOKEN}\n"}}
    pod = Pod.run(
        render("overlays/gke"), build_image(IMAGE, mar=mar_file), tmp_path_factory.mktemp("pod"), tokens
    )
    try:
        pod.wait_ready()
        yield pod
    finally:
        pod.remove()


def call(
    pod: Pod, method: str, path: str, authorization: str | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    """One request to the proxy's published port; `authorization` is the whole header value."""
    headers = {"Content-Type": "application/octet-stream"}
    if authorization is not None:
        headers["Authorization"] = authorization
    return http(method, f"http://127.0.0.1:{pod.port('http')}{path}", body, headers)


def bearer(token: str) -> str:
    return f"Bearer {token}"


# The tokens are lower-case hex, so upper() changes every letter. nginx compares a map's plain
# strings ignoring case; these cases fail if the map ever holds plain strings again.
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        bearer("wrong-token"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN + "0"),
        bearer(TOKEN.upper()),
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"Bearer  {TOKEN}",
        TOKEN,
        bearer(SYMBOLS_TOKEN.replace("a.b+c", "axbbc")),
    ],
    ids=[
        "none",
        "wrong",
        "prefix",
        "longer",
        "token-case",
        "scheme-lower",
        "scheme-upper",
        "two-spaces",
        "no-scheme",
        "regex-symbols",
    ],
)
def test_prediction_without_the_shared_token_is_401(pod: Pod, authorization: str | None) -> None:
    status, body = call(pod, "POST", "/predictions/fashion_mnist", authorization, PNG)
    assert status == 401
    assert json.loads(body)["error"] == "unauthorized"


@pytest.mark.parametrize("token", [TOKEN, NEXT_TOKEN, SYMBOLS_TOKEN], ids=["first", "second", "symbols"])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_prediction_with_a_shared_token_is_200(pod: Pod, token: str, method: str) -> None:
    status, body = call(pod, method, "/predictions/fashion_mnist", bearer(token), PNG)
    assert status == 200, body
    assert json.loads(body)["model"] == "fashion_mnist"


def test_bad_input_keeps_torchserve_answer(pod: Pod) -> None:
    status, body = call(pod, "POST", "/predictions/fashion_mnist", bearer(TOKEN), b"not an image")
    assert status == 400 and json.loads(body)["error"] == "unsupported_image"


@pytest.mark.parametrize("path", ["/models", "/models/fashion_mnist", "/metrics", "/api-description", "/"])
def test_management_and_other_paths_are_not_proxied(pod: Pod, path: str) -> None:
    status, body = call(pod, "GET", path, bearer(TOKEN))
    assert status == 404 and json.loads(body)["error"] == "not_found"


@pytest.mark.parametrize("port", [8080, 8081], ids=["inference", "management"])
def test_torchserve_ports_are_closed_outside_the_pod(pod: Pod, port: int) -> None:
    """From another network namespace (the host, on the pod's address) the proxy answers, but
    TorchServe's own APIs listen on the pod's loopback only (deploy/base/torchserve/config.properties)."""
    proxy_port = pod.container_spec("proxy")["ports"][0]["containerPort"]
    with socket.create_connection((pod.ip(), proxy_port), timeout=5):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((pod.ip(), port), timeout=5)


def test_health_needs_no_token(pod: Pod) -> None:
    assert call(pod, "GET", "/ping")[0] == 200
    assert call(pod, "GET", "/healthz")[0] == 200


def test_access_log_keeps_tokens_out(pod: Pod) -> None:
    call(pod, "POST", "/predictions/fashion_mnist", bearer(TOKEN), PNG)
    logs = pod.containers["proxy"].logs()
    assert '"POST /predictions/fashion_mnist HTTP/1.1" 200' in logs
    assert TOKEN not in logs


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("", "holds no token"),
        ("short\n", "not 32 to 128 characters"),
        ("x" * 40 + '";return\n', "characters outside"),
    ],
    ids=["empty", "short", "quote"],
)
def test_proxy_refuses_a_bad_secret(mar_file: Path, tmp_path: Path, tokens: str, message: str) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "tokens").write_text(tokens)
    (secret / "tokens").chmod(0o444)
    flags = [*hardened_flags("128m", ("/tmp",)), f"--volume={secret}:/var/run/secrets/fashion-mnist:ro"]
    proxy = Container.run(build_image(IMAGE, mar=mar_file), "/opt/fashion-serve/proxy.sh", flags=flags)
    try:
        assert proxy.wait_exit() == 2
        assert message in proxy.logs()
    finally:
        proxy.remove()
