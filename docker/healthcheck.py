"""Health check of the serving container: exit 0 when TorchServe answers /ping with "Healthy".

    python3 /opt/fashion-serve/healthcheck.py     # the image's HEALTHCHECK and the pod's exec probes

It reads the config the server runs with (TS_CONFIG_FILE) for the inference address and for
whether token authorization is on. When it is, it sends the inference key from key_file.json,
which TorchServe writes into its working directory, the same directory this check runs in (the
image's WORKDIR). Standard library only, so it starts in a few tens of milliseconds: the config is
read by serving/properties.py, which the image ships alone as /opt/fashion-serve/serving/properties.py.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from serving.properties import ConfigError, parse_properties

DEFAULT_CONFIG = "/opt/fashion-serve/config.properties"
TIMEOUT_S = 4.0


def ping_url(props: dict[str, str]) -> str:
    """/ping on the inference listener, reached over loopback whatever address it binds."""
    address = urlsplit(props.get("inference_address", "http://127.0.0.1:8080"))
    return f"{address.scheme}://127.0.0.1:{address.port or 8080}/ping"


def auth_headers(props: dict[str, str], key_file: Path) -> dict[str, str]:
    if props.get("disable_token_authorization", "false").lower() == "true":
        return {}
    key = json.loads(key_file.read_text(encoding="utf-8"))["inference"]["key"]
    return {"Authorization": f"Bearer {key}"}


def check(config: Path, key_file: Path) -> str | None:
    """None when healthy, else the reason."""
    try:
        props = parse_properties(config.read_text(encoding="utf-8"))
    except (OSError, ConfigError) as exc:
        return f"cannot read TorchServe's config {config} (TS_CONFIG_FILE): {exc}"
    try:
        headers = auth_headers(props, key_file)
    except FileNotFoundError as exc:
        return f"{exc.filename} not found (TorchServe writes key_file.json once it has started)"
    except (KeyError, ValueError) as exc:
        return f"cannot read the inference key from {key_file}: {exc!r}"
    # No proxy from the environment: the server is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(ping_url(props), headers=headers), timeout=TIMEOUT_S) as resp:
            status = json.load(resp).get("status")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"GET {ping_url(props)} failed: {exc}"
    return None if status == "Healthy" else f"TorchServe reports status {status!r}"


def main() -> int:
    problem = check(Path(os.environ.get("TS_CONFIG_FILE", DEFAULT_CONFIG)), Path("key_file.json"))
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
