"""Run a local TorchServe and talk to it through its REST APIs.

    python -m scripts.serve start                  # waits until the server answers /ping
    python -m scripts.serve register               # model_store/fashion_mnist.mar via the management API
    python -m scripts.serve predict shirt.png pics/   # a top-k table, one row per image
    python -m scripts.serve scale --min-workers 2 --max-workers 2
    python -m scripts.serve status
    python -m scripts.serve unregister
    python -m scripts.serve stop                   # returns once the JVM and its workers have exited

Every server is an *instance* (--instance, default "default") with its own directory
.serve/<instance>/ (--state-dir): the JVM runs there, so TorchServe writes key_file.json there;
tmp/ is its TMPDIR (PID file, worker sockets); logs/ has ts.log (everything this run of the
server printed; the run before is ts.log.1) and access_log.log; config.properties is the
repository's file plus the instance's ports; instance.json records the PID and ports for the
other commands. Ports come from the flags of `start` or FASHION_SERVE_<NAME>_PORT (0 = any free
port). The keys for the management and inference APIs are read from key_file.json, and renewed
through TorchServe's token API when they have expired. Exit status: 0 on success, 1 with an
explanation on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "config.properties"
LOG_CONFIG_FILE = REPO / "configs" / "serving" / "log4j2.xml"
METRICS_CONFIG_FILE = REPO / "configs" / "serving" / "metrics.yaml"
MODEL_NAME = "fashion_mnist"
HOST = "127.0.0.1"
DEFAULT_PORTS = {
    "inference": 8080,
    "management": 8081,
    "metrics": 8082,
    "grpc_inference": 7070,
    "grpc_management": 7071,
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Linux caps a unix socket path at 107 bytes; TorchServe puts "<TMPDIR>/.ts.sock.9000" there.
MAX_TMPDIR_LEN = 80
# Renew a key this long before TorchServe's own expiry, so a request never races it.
KEY_RENEW_MARGIN = timedelta(seconds=30)
START_HINT = "start it with `python -m scripts.serve start`"
STARTUP_FAILED = "Torchserve stopped."


class ServeError(RuntimeError):
    """A failure the user can act on; the CLI prints the message without a traceback."""


@dataclass(frozen=True)
class Instance:
    """Where one server's files live: <state_root>/<name>/."""

    name: str = "default"
    state_root: Path = Path(".serve")

    @property
    def dir(self) -> Path:
        return (self.state_root / self.name).resolve()

    @property
    def tmp_dir(self) -> Path:
        return self.dir / "tmp"

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "ts.log"

    @property
    def key_file(self) -> Path:
        return self.dir / "key_file.json"

    @property
    def config_file(self) -> Path:
        return self.dir / "config.properties"

    @property
    def record_file(self) -> Path:
        return self.dir / "instance.json"


@dataclass(frozen=True)
class Server:
    """A started server, as recorded in instance.json."""

    pid: int
    create_time: float
    model_store: str
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, api: str) -> str:
        return f"http://{HOST}:{self.ports[api]}"


# --- lifecycle -------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free right now (all held open while choosing)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


def resolve_ports(requested: dict[str, int] | None = None) -> dict[str, int]:
    """Fill in defaults for the five listeners; replace 0 by a free port."""
    ports = {**DEFAULT_PORTS, **(requested or {})}
    zeros = [name for name, port in ports.items() if port == 0]
    ports.update(zip(zeros, free_ports(len(zeros)), strict=True))
    return ports


def read_record(instance: Instance) -> Server | None:
    if not instance.record_file.is_file():
        return None
    return Server(**json.loads(instance.record_file.read_text(encoding="utf-8")))


def server_process(server: Server) -> psutil.Process | None:
    """The recorded JVM if it is still running (the PID may have been reused by now)."""
    try:
        proc = psutil.Process(server.pid)
        alive = proc.create_time() == server.create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return None
    return proc if alive else None


def running(instance: Instance) -> Server | None:
    """The instance's server if its JVM is alive."""
    server = read_record(instance)
    return server if server is not None and server_process(server) is not None else None


def log_tail(instance: Instance, lines: int = 15) -> str:
    if not instance.log_file.is_file():
        return "(no log written)"
    text = instance.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def instance_config(ports: dict[str, int], base: str | None = None) -> str:
    """`base` (default: the repository's config.properties) plus this instance's loopback listeners
    and the metrics config (later keys win)."""
    overrides = [
        f"metrics_config={METRICS_CONFIG_FILE}",
        f"inference_address=http://{HOST}:{ports['inference']}",
        f"management_address=http://{HOST}:{ports['management']}",
        f"metrics_address=http://{HOST}:{ports['metrics']}",
        f"grpc_inference_address={HOST}",
        f"grpc_management_address={HOST}",
        f"grpc_inference_port={ports['grpc_inference']}",
        f"grpc_management_port={ports['grpc_management']}",
    ]
    header = "\n# --- written by scripts/serve.py start: this instance's ports ---\n"
    base = CONFIG_FILE.read_text(encoding="utf-8") if base is None else base
    return base + header + "\n".join(overrides) + "\n"


def tokens_enabled(instance: Instance) -> bool:
    """Whether the instance's config leaves TorchServe's token authorization on (its default)."""
    text = instance.config_file.read_text(encoding="utf-8") if instance.config_file.is_file() else ""
    values = re.findall(r"^\s*disable_token_authorization\s*[=:]\s*(\S*)", text, re.MULTILINE)
    return not values or values[-1].lower() != "true"


def check_ports_free(ports: dict[str, int]) -> None:
    """Fail clearly now rather than let TorchServe half-start (it stays up if gRPC cannot bind)."""
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds
            try:
                sock.bind((HOST, port))
            except OSError:
                raise ServeError(
                    f"port {port} ({name}) on {HOST} is in use: stop the server using it, or pick another "
                    f"with --{name.replace('_', '-')}-port (0 = any free port)"
                ) from None


def check_prerequisites(instance: Instance, model_store: Path) -> None:
    if not model_store.is_dir():
        raise ServeError(
            f"model store {model_store} does not exist: build the archive with "
            "`python -m archive.build --export-dir artifacts/model --store model_store`"
        )
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which(f"{java_home}/bin/java" if java_home else "java") is None:
        raise ServeError("java not found: TorchServe needs Java 17 (run `scripts/setup.sh` or set JAVA_HOME)")
    if len(str(instance.tmp_dir)) > MAX_TMPDIR_LEN:
        raise ServeError(
            f"{instance.tmp_dir} is too long for TorchServe's unix sockets: "
            f"pass a shorter --state-dir (at most {MAX_TMPDIR_LEN} characters with /<instance>/tmp)"
        )


def start(
    instance: Instance,
    model_store: Path,
    ports: dict[str, int] | None = None,
    timeout: float = 120.0,
    config: str | None = None,
) -> Server:
    """Start TorchServe for `instance` and return once /ping answers 200.

    `config` is the properties text to run (default: the repository's config.properties); the
    instance's loopback addresses and ports are appended to it.

    Raises ServeError if it is already running, cannot start, or is not ready within `timeout`
    seconds (then it is stopped again and the last log lines are in the message).
    """
    model_store = Path(model_store).resolve()
    check_prerequisites(instance, model_store)
    if (current := running(instance)) is not None:
        raise ServeError(
            f"instance {instance.name!r} is already running (pid {current.pid}, {current.url('inference')}): "
            f"stop it with `python -m scripts.serve --instance {instance.name} stop`"
        )
    ports = resolve_ports(ports)
    check_ports_free(ports)
    # Leftovers of an earlier run (unpacked archives, a PID file, keys) would confuse the launcher
    # and the clients; no server of this instance is running, so they can all go.
    shutil.rmtree(instance.tmp_dir, ignore_errors=True)
    for stale in (instance.record_file, instance.key_file):
        stale.unlink(missing_ok=True)
    for directory in (instance.tmp_dir, instance.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    if instance.log_file.exists():  # keep the previous run's log; ts.log is this run's alone
        instance.log_file.replace(instance.log_file.with_suffix(".log.1"))
    instance.config_file.write_text(instance_config(ports, config), encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if k != "TS_CONFIG_FILE"}  # it would override --ts-config
    # TMPDIR: the launcher's PID file; TEMP: the JVM's java.io.tmpdir, where worker sockets go.
    env.update(TMPDIR=str(instance.tmp_dir), TEMP=str(instance.tmp_dir))
    env.update(LOG_LOCATION=str(instance.log_dir), METRICS_LOCATION=str(instance.log_dir))
    command = [
        sys.executable, "-m", "ts.model_server", "--start", "--ncs",
        "--ts-config", str(instance.config_file),
        "--log-config", str(LOG_CONFIG_FILE),
        "--model-store", str(model_store),
    ]  # fmt: skip
    with instance.log_file.open("ab") as log:
        # The launcher starts the JVM and exits; the JVM keeps the log as its stdout. A new
        # session keeps a Ctrl-C in this terminal from reaching the server.
        launcher = subprocess.run(
            command, cwd=instance.dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    pid_file = instance.tmp_dir / ".model_server.pid"
    if launcher.returncode != 0 or not pid_file.is_file():
        raise ServeError(f"the TorchServe launcher failed; end of {instance.log_file}:\n{log_tail(instance)}")
    pid = int(pid_file.read_text().strip())
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.Error:
        raise ServeError(
            f"TorchServe exited at once; last lines of {instance.log_file}:\n{log_tail(instance)}"
        ) from None
    server = Server(pid=pid, create_time=create_time, model_store=str(model_store), ports=ports)
    instance.record_file.write_text(json.dumps(asdict(server), indent=2) + "\n", encoding="utf-8")
    try:
        wait_ready(instance, server, timeout)
    except BaseException:  # whatever went wrong (even Ctrl-C), leave no half-started JVM behind
        stop(instance)
        raise
    return server


def wait_ready(instance: Instance, server: Server, timeout: float) -> None:
    """Poll until /ping answers 200 with the inference key; fail early if the JVM dies."""
    deadline = time.monotonic() + timeout
    tokens = tokens_enabled(instance)
    client = Client(server.url("inference"), server.url("management"), instance.key_file if tokens else None)
    try:
        while True:
            # A JVM that failed to bind logs "Torchserve stopped." but does not exit.
            failed = STARTUP_FAILED in instance.log_file.read_text(errors="replace")
            if failed or server_process(server) is None:
                raise ServeError(
                    f"TorchServe failed to start; last lines of {instance.log_file}:\n{log_tail(instance)}"
                )
            if instance.key_file.is_file() or not tokens:
                try:
                    if client.ping().get("status") == "Healthy":
                        return
                except ServeError:
                    pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServeError(
                    f"TorchServe did not answer /ping within {timeout:.0f}s; "
                    f"last lines of {instance.log_file}:\n{log_tail(instance)}"
                )
            time.sleep(0.2)
    finally:
        client.close()


def stop(instance: Instance, timeout: float = 60.0) -> bool:
    """Stop the instance's JVM and wait until it and its workers have exited.

    Returns False if nothing was running. After `timeout` seconds whatever is left is killed.
    """
    server = read_record(instance)
    proc = server_process(server) if server is not None else None
    if proc is not None:
        try:
            family = [proc, *proc.children(recursive=True)]
            proc.terminate()  # TorchServe's shutdown hook stops the workers, then the JVM exits
        except psutil.NoSuchProcess:
            family = []
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for leftover in alive:
            leftover.kill()
        psutil.wait_procs(alive, timeout=10)
    for stale in (instance.record_file, instance.key_file, instance.tmp_dir / ".model_server.pid"):
        stale.unlink(missing_ok=True)
    return proc is not None


# --- REST client -----------------------------------------------------------------------------------


def read_keys(key_file: Path, timeout: float = 2.0) -> dict[str, Any]:
    """The parsed key file. TorchServe rewrites it in place (at start and on renewal), so a read
    can catch it half-written: such reads are retried for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(key_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ServeError(
                f"no key file at {key_file}: TorchServe writes it into its working directory when it "
                f"starts; {START_HINT}, or pass --key-file"
            ) from None
        except json.JSONDecodeError:
            if time.monotonic() > deadline:
                raise ServeError(
                    f"{key_file} is not valid JSON: pass the key_file.json of a running server"
                ) from None
            time.sleep(0.05)


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
            raise ServeError(
                f"the server refused the {api} key from {self.key_file}: the key file belongs to another "
                "server run (restart with `python -m scripts.serve stop` and `start`) or pass --key-file"
            )
        return resp

    def call(self, api: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One authorised request; the response is returned whatever its status."""
        return self._send(api, method, path, key=self.key(api), **kwargs)

    def close(self) -> None:
        self.session.close()

    def ping(self) -> dict[str, Any]:
        """{"status": "Healthy"}, or "Partial Healthy"/"Unhealthy" while models lack workers."""
        resp = self.call("inference", "GET", "/ping")
        try:
            return resp.json()
        except ValueError:
            return {"status": f"HTTP {resp.status_code}"}

    def models(self) -> list[dict[str, Any]]:
        return expect_ok(self.call("management", "GET", "/models"), "list models")["models"]

    def describe(self, model: str = MODEL_NAME) -> list[dict[str, Any]]:
        return expect_ok(self.call("management", "GET", f"/models/{model}"), f"describe {model}", model)

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
            raise ServeError(
                f"registration refused: {error_fields(resp)[1]}. Only names of archives in the server's "
                "model store are accepted (no URLs, no ../); build one with `python -m archive.build`"
            )
        if resp.status_code == 409:
            raise ServeError(
                f"{error_fields(resp)[1]}: unregister it first (`python -m scripts.serve unregister`), "
                "or change its workers with `scale`"
            )
        return expect_ok(resp, f"register {archive}")

    def unregister(self, model: str = MODEL_NAME) -> dict[str, Any]:
        return expect_ok(self.call("management", "DELETE", f"/models/{model}"), f"unregister {model}", model)

    def scale(self, min_workers: int, max_workers: int, model: str = MODEL_NAME) -> dict[str, Any]:
        """Set the worker range; returns once the workers have started or stopped."""
        params = {"min_worker": str(min_workers), "max_worker": str(max_workers), "synchronous": "true"}
        resp = self.call("management", "PUT", f"/models/{model}", params=params)
        return expect_ok(resp, f"scale {model}", model)

    def predict(self, image: bytes, model: str = MODEL_NAME, top_k: int | None = None) -> requests.Response:
        """POST raw image bytes; the response is returned whatever its status (400/413 for bad images)."""
        headers = {"Content-Type": "application/octet-stream"}
        if top_k is not None:
            headers["X-Top-K"] = str(top_k)
        resp = self.call("inference", "POST", f"/predictions/{model}", data=image, headers=headers)
        if resp.status_code == 404 and error_fields(resp)[0] == "ModelNotFoundException":
            raise ServeError(f"model {model!r} is not registered: run `python -m scripts.serve register`")
        if resp.status_code == 503:
            raise ServeError(
                f"model {model!r} could not take the request ({error_fields(resp)[1]}): see "
                "`python -m scripts.serve status`; without a ready worker, add one with "
                "`python -m scripts.serve scale --min-workers 1 --max-workers 1`"
            )
        return resp


def error_fields(resp: requests.Response) -> tuple[str, str]:
    """(kind, message) of a TorchServe error {"type", "message"} or a handler error {"error", "detail"}."""
    try:
        body = resp.json()
    except ValueError:
        return "", resp.text.strip()[:200] or resp.reason
    if not isinstance(body, dict):
        return "", str(body)[:200]
    return str(body.get("type", body.get("error", ""))), str(body.get("message", body.get("detail", "")))


def expect_ok(resp: requests.Response, action: str, model: str | None = None) -> Any:
    if resp.ok:
        return resp.json()
    kind, message = error_fields(resp)
    if resp.status_code == 404 and model is not None:
        raise ServeError(f"cannot {action}: model {model!r} is not registered ({message})")
    raise ServeError(f"cannot {action}: HTTP {resp.status_code} {kind} {message}".rstrip())


# --- CLI ---------------------------------------------------------------------------------------------


def image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """The given files, and the images (by suffix) under the given directories, sorted."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            yield path
        else:
            raise ServeError(f"{path} does not exist")


def label_slug(label: str) -> str:
    """A class name as it appears in a sample's file name (training.data --samples)."""
    return label.replace("/", "-").replace(" ", "-")


def truth_from_name(path: Path) -> str:
    """ "test00012_Ankle-boot.png" -> "Ankle-boot" (the label slug after the first underscore)."""
    return path.stem.partition("_")[2] or "?"


def prediction_cells(resp: requests.Response, top_k: int) -> list[str]:
    if not resp.ok:
        kind, message = error_fields(resp)
        return [f"HTTP {resp.status_code} {kind}: {message}"]
    return [f"{p['label']} {p['probability']:.3f}" for p in resp.json()["predictions"][:top_k]]


def format_table(header: Sequence[str], rows: Sequence[tuple[Sequence[str], bool]]) -> str:
    """Aligned columns sized by the header and the good rows; a bad row's last cell (its error
    message) runs on without widening the table."""
    sized = [header, *(cells for cells, good in rows if good)]
    widths = [max(len(cells[i]) for cells in sized if i < len(cells)) for i in range(len(header))]
    for cells, _ in rows:
        widths[0] = max(widths[0], len(cells[0]))
    lines = []
    for cells in [header, *(cells for cells, _ in rows)]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])] + [cells[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def cmd_start(args: argparse.Namespace, instance: Instance) -> int:
    ports = {name: getattr(args, f"{name}_port") for name in DEFAULT_PORTS}
    server = start(instance, args.model_store, ports, timeout=args.timeout)
    print(f"TorchServe instance {instance.name!r} is ready (pid {server.pid})")
    print(f"  inference   {server.url('inference')}   management {server.url('management')}")
    print(f"  metrics     {server.url('metrics')}/metrics")
    print(f"  keys        {instance.key_file}")
    print(f"  logs        {instance.log_dir}")
    print("next: python -m scripts.serve register")
    return 0


def cmd_stop(args: argparse.Namespace, instance: Instance) -> int:
    if stop(instance, timeout=args.timeout):
        print(f"TorchServe instance {instance.name!r} stopped")
    else:
        print(f"TorchServe instance {instance.name!r} was not running")
    return 0


def cmd_status(args: argparse.Namespace, instance: Instance) -> int:
    client = make_client(args, instance)
    health = client.ping()["status"]
    print(f"TorchServe at {client.urls['inference']}: {health}")
    for entry in client.models():
        for version in client.describe(entry["modelName"]):
            workers = version["workers"]
            ready = sum(w["status"] == "READY" for w in workers)
            print(
                f"  {version['modelName']} {version['modelVersion']}: {ready}/{len(workers)} workers ready "
                f"(min {version['minWorkers']}, max {version['maxWorkers']}), "
                f"batchSize {version['batchSize']}, maxBatchDelay {version['maxBatchDelay']} ms"
            )
    return 0 if health == "Healthy" else 1


def cmd_register(args: argparse.Namespace, instance: Instance) -> int:
    reply = make_client(args, instance).register(
        args.archive, args.batch_size, args.max_batch_delay, args.initial_workers
    )
    print(reply["status"])
    return 0


def cmd_unregister(args: argparse.Namespace, instance: Instance) -> int:
    print(make_client(args, instance).unregister(args.model)["status"])
    return 0


def cmd_scale(args: argparse.Namespace, instance: Instance) -> int:
    if not 0 <= args.min_workers <= args.max_workers:
        raise ServeError(
            f"need 0 <= --min-workers <= --max-workers, got {args.min_workers}, {args.max_workers}"
        )
    print(make_client(args, instance).scale(args.min_workers, args.max_workers, args.model)["status"])
    return 0


def cmd_predict(args: argparse.Namespace, instance: Instance) -> int:
    files = list(image_files(args.paths))
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ServeError(f"no images ({suffixes}) in {', '.join(map(str, args.paths))}")
    client = make_client(args, instance)
    rows, refused, correct = [], 0, 0
    for path in files:
        resp = client.predict(path.read_bytes(), args.model, args.top_k)
        cells = [str(path)]
        if args.truth_from_name:
            truth = truth_from_name(path)
            hit = resp.ok and label_slug(resp.json()["predictions"][0]["label"]) == truth
            correct += hit
            cells += [truth, "yes" if hit else "NO"]
        rows.append(([*cells, *prediction_cells(resp, args.top_k)], resp.ok))
        refused += not resp.ok
    header = ["image", *(["truth", "top-1 ok"] if args.truth_from_name else [])]
    print(format_table([*header, *(f"top-{i + 1}" for i in range(args.top_k))], rows))
    if args.truth_from_name:
        print(f"{correct} of {len(files)} top-1 predictions match the label in the file name")
    if refused:
        print(f"{refused} of {len(files)} images were refused", file=sys.stderr)
    return 1 if refused else 0


def make_client(args: argparse.Namespace, instance: Instance) -> Client:
    """Client for the instance, or for the server named by --inference-url/--management-url."""
    if args.inference_url or args.management_url:
        key_file = args.key_file
        return Client(
            args.inference_url or f"http://{HOST}:{DEFAULT_PORTS['inference']}",
            args.management_url or f"http://{HOST}:{DEFAULT_PORTS['management']}",
            None if key_file is None else Path(key_file),
        )
    client = Client.for_instance(instance)
    if args.key_file is not None:
        client.key_file = Path(args.key_file)
    return client


def env_port(name: str) -> int:
    variable = f"FASHION_SERVE_{name.upper()}_PORT"
    raw = os.environ.get(variable, str(DEFAULT_PORTS[name]))
    try:
        return int(raw)
    except ValueError:
        raise ServeError(f"{variable} must be a port number, got {raw!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--instance", default=os.environ.get("FASHION_SERVE_INSTANCE", "default"),
        help="server instance (env FASHION_SERVE_INSTANCE, default: default)",
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("FASHION_SERVE_STATE_DIR", ".serve")),
        help="where instance directories live (env FASHION_SERVE_STATE_DIR, default .serve)",
    )  # fmt: skip
    parser.add_argument("--inference-url", help="talk to this server instead of the instance's")
    parser.add_argument("--management-url", help="talk to this server instead of the instance's")
    parser.add_argument("--key-file", help="TorchServe key_file.json (default: the instance's)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="start TorchServe and wait until it answers /ping")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    for name in DEFAULT_PORTS:
        p.add_argument(
            f"--{name.replace('_', '-')}-port", type=int, default=env_port(name),
            help=f"(env FASHION_SERVE_{name.upper()}_PORT, default {DEFAULT_PORTS[name]}; 0 = any free port)",
        )  # fmt: skip
    p.set_defaults(run=cmd_start)

    p = sub.add_parser("stop", help="stop TorchServe and wait until it has exited")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before the remains are killed")
    p.set_defaults(run=cmd_stop)

    sub.add_parser("status", help="health, models and workers").set_defaults(run=cmd_status)

    p = sub.add_parser("register", help="register an archive from the model store")
    p.add_argument("archive", nargs="?", default=f"{MODEL_NAME}.mar", help="file name inside the model store")
    p.add_argument("--batch-size", type=int, help="override the archive's batchSize")
    p.add_argument("--max-batch-delay", type=int, help="override the archive's maxBatchDelay (ms)")
    p.add_argument("--initial-workers", type=int, help="workers, if the archive sets no minWorkers")
    p.set_defaults(run=cmd_register)

    p = sub.add_parser("unregister", help="remove a model")
    p.add_argument("--model", default=MODEL_NAME)
    p.set_defaults(run=cmd_unregister)

    p = sub.add_parser("scale", help="set a model's worker range")
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--min-workers", type=int, required=True)
    p.add_argument("--max-workers", type=int, required=True)
    p.set_defaults(run=cmd_scale)

    p = sub.add_parser("predict", help="classify image files or directories; prints a top-k table")
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--model", default=MODEL_NAME)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--truth-from-name", action="store_true",
        help='show the true label from file names like "test00012_Ankle-boot.png" (training.data --samples)',
    )  # fmt: skip
    p.set_defaults(run=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args, Instance(args.instance, args.state_dir))
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
