"""A typed client for TorchServe's management and inference REST APIs, with the right key per call.

    from serving.client import Client, RequestFailed
    client = Client.for_instance(instance)            # a local instance (serving.server)
    client.register()                                 # returns once the workers are up
    deploy(client, Path("model_store/fashion_mnist.mar"))  # its version beside the others, as default
    client.set_default("3f2a9c01b7de")                # rollback: one call
    try:
        top = client.predict(png, top_k=3).predictions[0].label
    except RequestFailed as err:                      # any non-2xx answer
        print(err.status, err.body)                   # e.g. 413 {"error": "image_too_large", ...}

Errors: `RequestFailed` (a ServeError) for every answer that is not 2xx, carrying the HTTP status
and the server's JSON body (its subclass `KeyRefused` when the server refused the key);
`ServeError` alone when no answer came (server down, timeout, unreadable key file). `Client.call`
sends any authorised request and returns the raw `requests.Response` whatever its status (except
a refused key), for callers (tests) that look at the status themselves.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from serving import MODEL_NAME
from serving.server import (
    START_HINT,
    InputError,
    Instance,
    ServeError,
    read_keys,
    read_record,
    server_process,
    tokens_enabled,
)
from serving.waiting import WaitTimeout, wait_for

# How long an unregistration waits for a full job queue to drain (a full queue of 16 batches of 8
# empties in well under a second; this leaves room for a loaded host).
QUEUE_DRAIN_S = 30.0
# Renew a key this long before TorchServe's own expiry, so a request never races it.
KEY_RENEW_MARGIN = timedelta(seconds=30)


class RequestFailed(ServeError):
    """The server answered with a status that is not 2xx.

    `status` is the HTTP status; `body` the parsed JSON answer ({} if it was not JSON: then
    `text` has it); `kind` and `detail` its error name and message: TorchServe's own
    {"type", "message"} or the handler's {"error", "detail"}. str(err) says what to do next where
    the status has a known cause.
    """

    def __init__(self, what: str, resp: requests.Response, hint: str = "") -> None:
        self.status = resp.status_code
        self.text = resp.text
        try:
            body = resp.json()
        except ValueError:
            body = None
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}
        self.kind, self.detail = error_fields(resp)
        message = f"{what}: HTTP {self.status} {self.kind} {self.detail}".rstrip()
        super().__init__(f"{message}{'; ' + hint if hint else ''}")


class KeyRefused(RequestFailed):
    """TorchServe refused the key (400 InvalidKeyException): the key file belongs to another server
    run, or the wrong file was given. Raised by every call, whatever it asked for."""


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The handler's answer: the model and version that answered, and the top-k classes."""

    model: str
    version: str
    predictions: tuple[Label, ...]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        labels = tuple(
            Label(p["label"], int(p["index"]), float(p["probability"])) for p in body["predictions"]
        )
        return cls(str(body["model"]), str(body["version"]), labels)


def error_fields(resp: requests.Response) -> tuple[str, str]:
    """(kind, message) of a TorchServe error {"type", "message"} or a handler error {"error", "detail"}."""
    try:
        body = resp.json()
    except ValueError:
        return "", resp.text.strip()[:200] or resp.reason
    if not isinstance(body, dict):
        return "", str(body)[:200]
    return str(body.get("type", body.get("error", ""))), str(body.get("message", body.get("detail", "")))


class Client:
    """Management and inference calls with the right key and a plain-words error for each failure."""

    def __init__(
        self, inference_url: str, management_url: str, key_file: Path | None, timeout: float = 60.0
    ) -> None:
        self.urls = {"inference": inference_url.rstrip("/"), "management": management_url.rstrip("/")}
        self.key_file = key_file
        self.timeout = timeout
        self.session = requests.Session()

    @classmethod
    def for_instance(cls, instance: Instance, timeout: float = 60.0) -> Client:
        server = read_record(instance)
        if server is None or server_process(server) is None:
            raise ServeError(f"TorchServe instance {instance.name!r} is not running: {START_HINT}")
        key_file = instance.key_file if tokens_enabled(instance) else None
        return cls(server.url("inference"), server.url("management"), key_file, timeout)

    def key(self, api: str) -> str | None:
        """The current key for "inference" or "management", renewed if it has expired."""
        if self.key_file is None:
            return None  # a server started with token authorization disabled
        entry = read_keys(self.key_file)[api]
        expires = datetime.fromisoformat(entry["expiration time"])
        if expires - datetime.now(UTC) < KEY_RENEW_MARGIN:
            api_key = read_keys(self.key_file)["API"]["key"]
            self._send("management", "POST", "/token", params={"type": api}, key=api_key)
            entry = read_keys(self.key_file)[api]
        return entry["key"]

    def _send(
        self, api: str, method: str, path: str, key: str | None = None, **kwargs: Any
    ) -> requests.Response:
        url = self.urls[api] + path
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        try:
            resp = self.session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise ServeError(f"no TorchServe answers at {self.urls[api]}: {START_HINT}") from None
        except requests.Timeout:
            raise ServeError(f"{method} {url} got no answer within {self.timeout:.0f}s") from None
        if resp.status_code == 400 and error_fields(resp)[0] == "InvalidKeyException":
            raise KeyRefused(
                f"the server refused the {api} key from {self.key_file}",
                resp,
                "the key file belongs to another server run (restart with `python -m scripts.serve stop` "
                "and `start`) or pass --key-file",
            )
        return resp

    def call(self, api: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One authorised request; the response is returned whatever its status."""
        return self._send(api, method, path, key=self.key(api), **kwargs)

    def close(self) -> None:
        self.session.close()

    def _expect_ok(self, resp: requests.Response, action: str, model: str | None = None) -> Any:
        if resp.ok:
            return resp.json()
        hint = ""
        if resp.status_code == 404 and model is not None:
            hint = f"model {model!r} is not registered: run `python -m scripts.serve register`"
        raise RequestFailed(f"cannot {action}", resp, hint)

    def ping(self) -> dict[str, Any]:
        """{"status": "Healthy"}, or "Partial Healthy"/"Unhealthy" while models lack workers."""
        resp = self.call("inference", "GET", "/ping")
        try:
            return resp.json()
        except ValueError:
            return {"status": f"HTTP {resp.status_code}"}

    def models(self) -> list[dict[str, Any]]:
        return self._expect_ok(self.call("management", "GET", "/models"), "list models")["models"]

    def describe(self, model: str = MODEL_NAME) -> list[dict[str, Any]]:
        return self._expect_ok(self.call("management", "GET", f"/models/{model}"), f"describe {model}", model)

    def register(
        self,
        archive: str = f"{MODEL_NAME}.mar",
        batch_size: int | None = None,
        max_batch_delay: int | None = None,
        initial_workers: int | None = None,
    ) -> dict[str, Any]:
        """Register an archive from the server's model store; returns once its workers are up.

        Unset settings come from the archive's model-config.yaml (workers, batching).
        """
        params = {"url": archive, "synchronous": "true"}
        optional = {
            "batch_size": batch_size,
            "max_batch_delay": max_batch_delay,
            "initial_workers": initial_workers,
        }
        params.update({name: str(value) for name, value in optional.items() if value is not None})
        resp = self.call("management", "POST", "/models", params=params)
        if resp.status_code == 404:
            raise RequestFailed(
                "registration refused",
                resp,
                "only names of archives in the server's model store are accepted (no URLs, no ../); "
                "build one with `python -m archive.build`",
            )
        if resp.status_code == 409:
            raise RequestFailed(
                "already registered",
                resp,
                "unregister it first (`python -m scripts.serve unregister`), or change its workers "
                "with `scale`",
            )
        return self._expect_ok(resp, f"register {archive}")

    def set_default(self, version: str, model: str = MODEL_NAME) -> dict[str, Any]:
        """Make `version` the one /predictions/<model> serves; the others stay registered for rollback."""
        resp = self.call("management", "PUT", f"/models/{model}/{version}/set-default")
        if resp.status_code == 404:
            raise RequestFailed(
                f"cannot make {model} {version} the default",
                resp,
                "`python -m scripts.serve status` lists the registered versions",
            )
        return self._expect_ok(resp, f"make {model} {version} the default", model)

    def versions(self, model: str = MODEL_NAME) -> list[str]:
        """The registered versions of `model`; [] when it is not registered at all."""
        resp = self.call("management", "GET", f"/models/{model}/all")
        if resp.status_code == 404:
            return []
        return [entry["modelVersion"] for entry in self._expect_ok(resp, f"describe {model}", model)]

    def default_version(self, model: str = MODEL_NAME) -> str:
        """The version /predictions/<model> serves (GET /models/<model> describes only the default)."""
        return str(self.describe(model)[0]["modelVersion"])

    def unregister(self, model: str = MODEL_NAME, drain_timeout: float = QUEUE_DRAIN_S) -> dict[str, Any]:
        """Unregister `model`. TorchServe queues the unregistration behind the model's pending
        requests and answers 500 "Deque full" while that queue is full (right after an overload):
        such answers are retried for up to `drain_timeout` s while the queue drains."""

        def attempt() -> requests.Response | None:
            resp = self.call("management", "DELETE", f"/models/{model}")
            full = resp.status_code == 500 and "Deque full" in error_fields(resp)[1]
            return None if full else resp

        try:
            resp = wait_for(attempt, drain_timeout, f"{model}'s job queue to drain", interval=0.25)
        except WaitTimeout:
            raise ServeError(
                f"cannot unregister {model}: its job queue stayed full for {drain_timeout:g} s; stop "
                "the clients sending to it, then try again"
            ) from None
        return self._expect_ok(resp, f"unregister {model}", model)

    def scale(self, min_workers: int, max_workers: int, model: str = MODEL_NAME) -> dict[str, Any]:
        """Set the worker range; returns once the workers have started or stopped."""
        params = {"min_worker": str(min_workers), "max_worker": str(max_workers), "synchronous": "true"}
        resp = self.call("management", "PUT", f"/models/{model}", params=params)
        return self._expect_ok(resp, f"scale {model}", model)

    def predict(self, image: bytes, model: str = MODEL_NAME, top_k: int | None = None) -> Prediction:
        """POST raw image bytes; the top-k classes, or RequestFailed for any non-2xx answer
        (400/413: the image was refused, its `kind` says why; 404: no such model; 503: no worker
        or a full queue)."""
        headers = {"Content-Type": "application/octet-stream"}
        if top_k is not None:
            headers["X-Top-K"] = str(top_k)
        resp = self.call("inference", "POST", f"/predictions/{model}", data=image, headers=headers)
        if resp.ok:
            return Prediction.from_json(resp.json())
        hint = ""
        if resp.status_code == 404 and error_fields(resp)[0] == "ModelNotFoundException":
            hint = f"model {model!r} is not registered: run `python -m scripts.serve register`"
        elif resp.status_code == 503:
            hint = (
                "see `python -m scripts.serve status`; without a ready worker, add one with "
                "`python -m scripts.serve scale --min-workers 1 --max-workers 1`"
            )
        raise RequestFailed(f"{model!r} refused the request", resp, hint)


def archive_identity(archive: Path) -> tuple[str, str]:
    """(model name, version) from a .mar's MAR-INF/MANIFEST.json; InputError if it is not one."""
    try:
        with zipfile.ZipFile(archive) as mar:
            model = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(
            f"{archive} is not a model archive ({exc}): build one with `python -m archive.build`"
        ) from None


def deploy(client: Client, archive: Path) -> tuple[str, str, bool]:
    """Serve `archive`'s version as its model's default, next to the versions already registered.

    The archive is copied to <store>/<name>-<version>.mar (the store is its directory, which must
    be the server's model store), so each version keeps its own file for a later re-registration.
    Returns (name, version, registered_now); registering is skipped when the version is up already.
    """
    name, version = archive_identity(archive)
    versioned = archive.with_name(f"{name}-{version}.mar")
    if not versioned.is_file():
        shutil.copyfile(archive, versioned)
    registered_now = version not in client.versions(name)
    if registered_now:
        client.register(versioned.name)
    client.set_default(version, name)
    return name, version, registered_now
