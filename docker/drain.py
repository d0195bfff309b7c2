"""Drain TorchServe before it stops, so that every request it has accepted gets its answer.

    python3 /opt/fashion-serve/drain.py     # docker/serve.sh runs it on SIGTERM, before `torchserve --stop`

1. Cut off new requests. With token authorization on (the image's own config), renew the inference
   key through TorchServe's token API: a request with the old key is refused at once (400
   InvalidKeyException) while the requests already queued keep their place. Scaling to zero
   workers cannot be the cut-off: TorchServe 0.12 fails the batch a worker holds with 500 "Worker
   scaled down." and never answers the requests still queued. In the pod, token authorization is
   off and the proxy has stopped accepting before TorchServe's SIGTERM (docs/deploy.md).
2. Wait for what was accepted: a marker prediction, queued behind every accepted request. The queue
   is first in, first out, and a worker answers its batch before it takes the next, so the
   marker's answer means everything queued before it has been answered (exact with one worker
   per model, as the archive ships; with more, a worker may still hold a batch).
3. Scale every model to zero workers (the management API allows it with enable_model_api=false):
   a later request is answered 503, and the workers exit before the JVM does.

Gives up after DRAIN_TIMEOUT_S seconds (default 3), so that `docker stop`'s 10 s grace period still
covers TorchServe's own stop (3 to 4 s on a busy 2-core machine). Exit 0 when drained, 1 when it
gave up (the reason on stderr).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from healthcheck import DEFAULT_CONFIG
from PIL import Image

from serving.properties import parse_properties

KEY_FILE = Path("key_file.json")  # TorchServe's working directory, the image's WORKDIR
RETRY_S = 0.05


class Drain:
    """TorchServe's APIs over loopback, with the keys of key_file.json when authorization is on."""

    def __init__(self, props: dict[str, str], deadline: float) -> None:
        self.deadline = deadline
        self.auth = props.get("disable_token_authorization", "false").lower() != "true"
        self.urls = {
            api: loopback(props.get(f"{api}_address", f"http://127.0.0.1:{port}"))
            for api, port in (("inference", 8080), ("management", 8081))
        }
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def key(self, kind: str) -> str:
        return json.loads(KEY_FILE.read_text(encoding="utf-8"))[kind]["key"]

    def call(
        self, api: str, method: str, path: str, key: str | None = None, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """(status, body); HTTP errors are answers. Raises TimeoutError past the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the drain deadline passed")
        headers = {"Content-Type": "application/octet-stream"}
        if self.auth:
            headers["Authorization"] = f"Bearer {key or self.key(api)}"
        request = urllib.request.Request(self.urls[api] + path, data=body, headers=headers, method=method)
        try:
            with self.opener.open(request, timeout=left) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def cut_off(self) -> None:
        if self.auth:
            status, body = self.call("management", "POST", "/token?type=inference", key=self.key("API"))
            if status != 200:
                raise RuntimeError(f"renewing the inference key got {status}: {body[:200]!r}")

    def models(self) -> list[dict[str, Any]]:
        status, body = self.call("management", "GET", "/models")
        if status != 200:
            raise RuntimeError(f"listing the models got {status}: {body[:200]!r}")
        return json.loads(body)["models"]

    def ready_workers(self, model: str) -> int:
        status, body = self.call("management", "GET", f"/models/{quote(model)}")
        if status != 200:
            raise RuntimeError(f"describing {model} got {status}: {body[:200]!r}")
        return sum(w["status"] == "READY" for entry in json.loads(body) for w in entry["workers"])

    def wait_for_accepted(self, model: str) -> None:
        """Until a marker queued behind every accepted request is answered (503: queue full, retry)."""
        marker = io.BytesIO()
        Image.new("L", (28, 28)).save(marker, format="PNG")
        while True:
            status, body = self.call(
                "inference", "POST", f"/predictions/{quote(model)}", body=marker.getvalue()
            )
            if status == 200:
                return
            if status != 503:
                raise RuntimeError(f"the marker prediction for {model} got {status}: {body[:200]!r}")
            time.sleep(RETRY_S)

    def scale_to_zero(self, model: str) -> None:
        # Not synchronous: TorchServe 0.12 then answers 500 "Failed to start workers" although
        # the workers stop. The model has no worker from the moment the call returns 202.
        path = f"/models/{quote(model)}?min_worker=0&max_worker=0&synchronous=false"
        status, body = self.call("management", "PUT", path)
        if status != 202:
            raise RuntimeError(f"scaling {model} to zero workers got {status}: {body[:200]!r}")


def loopback(address: str) -> str:
    """A TorchServe listener reached over loopback, whatever address it binds."""
    parts = urlsplit(address)
    return f"{parts.scheme}://127.0.0.1:{parts.port}"


def main() -> int:
    started = time.monotonic()
    timeout = float(os.environ.get("DRAIN_TIMEOUT_S", "3"))
    try:
        props = parse_properties(
            Path(os.environ.get("TS_CONFIG_FILE", DEFAULT_CONFIG)).read_text(encoding="utf-8")
        )
        drain = Drain(props, started + timeout)
        drain.cut_off()
        names = [entry["modelName"] for entry in drain.models()]
        for name in names:
            # Without a ready worker no batch is running, and a marker would only wait for one
            # to load (a stop right after start).
            if drain.ready_workers(name):
                drain.wait_for_accepted(name)
        for name in names:
            drain.scale_to_zero(name)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        # TimeoutError and URLError are OSErrors: a server that never started or stopped answering.
        # An unreadable config is an OSError or a ConfigError (a ValueError).
        print(f"drain.py: gave up after {time.monotonic() - started:.1f} s: {exc!r}", file=sys.stderr)
        return 1
    print(f"drain.py: {', '.join(names)} drained in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
