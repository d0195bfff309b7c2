"""Start, stop and find local TorchServe instances; read their keys.

    from serving import server
    instance = server.Instance("mine", Path("/tmp/state"))
    srv = server.start(instance, Path("model_store"), server.ANY_PORTS)   # returns once /ping is Healthy
    server.stop(instance)                                                 # returns once the JVM has exited

The command line is `python -m scripts.serve`. Every server is an *instance* with its own directory
<state_root>/<name>/: the JVM runs there, so TorchServe writes key_file.json there; tmp/ is its
TMPDIR (PID file, worker sockets); logs/ has ts.log (this run; the run before is ts.log.1) and
access_log.log; config.properties is the local target of serving.tsconfig plus the instance's
ports; instance.json records the PID and ports for the other commands.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from serving import REPO, tsconfig
from serving.waiting import WaitTimeout, wait_for

LOG_CONFIG_FILE = REPO / "configs" / "serving" / "log4j2.xml"
METRICS_CONFIG_FILE = REPO / "configs" / "serving" / "metrics.yaml"  # the model's metric declarations
DEFAULT_STATE_ROOT = REPO / ".serve"
HOST = "127.0.0.1"
DEFAULT_PORTS = {
    "inference": 8080,
    "management": 8081,
    "metrics": 8082,
    "grpc_inference": 7070,
    "grpc_management": 7071,
}
ANY_PORTS = dict.fromkeys(DEFAULT_PORTS, 0)  # every listener on a free port (tests, benchmarks)
# Linux caps a unix socket path at 107 bytes; TorchServe puts "<TMPDIR>/.ts.sock.9000" there.
MAX_TMPDIR_LEN = 80
START_HINT = "start it with `python -m scripts.serve start`"
STARTUP_FAILED = "Torchserve stopped."


class ServeError(RuntimeError):
    """A failure the user can act on; command lines print the message without a traceback."""


class InputError(ServeError):
    """Bad input from the user: a missing file, a bad value. Command lines exit 2 for it."""


def exit_status(err: ServeError) -> int:
    """Print `err` for a command line and return its exit status: 2 for input errors, 1 for failures."""
    print(f"error: {err}", file=sys.stderr)
    return 2 if isinstance(err, InputError) else 1


def _inside(*parts: str) -> property:
    """A read-only attribute: the path `parts` inside the instance's directory."""

    def path(self: Instance) -> Path:
        return self.dir.joinpath(*parts)

    return property(path)


@dataclass(frozen=True)
class Instance:
    """Where one server's files live: <state_root>/<name>/."""

    name: str = "default"
    state_root: Path = DEFAULT_STATE_ROOT

    @property
    def dir(self) -> Path:
        return (self.state_root / self.name).resolve()

    tmp_dir = _inside("tmp")  # TorchServe's TMPDIR: PID file, worker sockets
    log_dir = _inside("logs")
    log_file = _inside("logs", "ts.log")
    key_file = _inside("key_file.json")  # written by TorchServe into its working directory
    config_file = _inside("config.properties")
    record_file = _inside("instance.json")


@dataclass(frozen=True)
class Server:
    """A started server, as recorded in instance.json."""

    pid: int
    create_time: float
    model_store: str
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, api: str) -> str:
        return f"http://{HOST}:{self.ports[api]}"


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


def instance_config(
    ports: dict[str, int],
    target: str = "local",
    settings: Mapping[str, str] | None = None,
    config: str | None = None,
) -> str:
    """The config.properties of `target` (serving.tsconfig), or the properties text `config` when
    given, with this instance's listeners, all on loopback whatever the target binds, and then
    `settings`, which apply to this instance only."""
    listeners = {
        "metrics_config": str(METRICS_CONFIG_FILE),
        "inference_address": f"http://{HOST}:{ports['inference']}",
        "management_address": f"http://{HOST}:{ports['management']}",
        "metrics_address": f"http://{HOST}:{ports['metrics']}",
        "grpc_inference_address": HOST,
        "grpc_management_address": HOST,
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
    }
    if config is None:
        text = tsconfig.render(target, listeners)
    else:
        text = tsconfig.override(config, listeners, "This instance's listeners (serving.server.start).")
    return (
        tsconfig.override(text, settings, "This instance only (serving.server.start).") if settings else text
    )


def tokens_enabled(instance: Instance) -> bool:
    """Whether the instance runs with TorchServe's token authorization on (the pod's config turns it
    off: then there is no key file, and requests carry no key)."""
    if not instance.config_file.is_file():
        return True
    config = tsconfig.parse_properties(instance.config_file.read_text(encoding="utf-8"))
    return config.get("disable_token_authorization", "false").lower() != "true"


def check_ports_free(ports: dict[str, int]) -> None:
    """Fail clearly now rather than let TorchServe half-start (it stays up if gRPC cannot bind)."""
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds
            try:
                sock.bind((HOST, port))
            except OSError:
                raise InputError(
                    f"port {port} ({name}) on {HOST} is in use: stop the server using it, or pick another "
                    f"with --{name.replace('_', '-')}-port (0 = any free port)"
                ) from None


def check_prerequisites(instance: Instance, model_store: Path) -> None:
    if not model_store.is_dir():
        raise InputError(
            f"model store {model_store} does not exist: build the archive with "
            "`python -m archive.build --export-dir artifacts/model --store model_store`"
        )
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which(f"{java_home}/bin/java" if java_home else "java") is None:
        raise ServeError("java not found: TorchServe needs Java 17 (run `scripts/setup.sh` or set JAVA_HOME)")
    if len(str(instance.tmp_dir)) > MAX_TMPDIR_LEN:
        raise InputError(
            f"{instance.tmp_dir} is too long for TorchServe's unix sockets: "
            f"pass a shorter --state-dir (at most {MAX_TMPDIR_LEN} characters with /<instance>/tmp)"
        )


def start(
    instance: Instance,
    model_store: Path,
    ports: dict[str, int] | None = None,
    timeout: float = 120.0,
    target: str = "local",
    settings: Mapping[str, str] | None = None,
    config: str | None = None,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start TorchServe for `instance` and return once /ping answers 200.

    It runs the config of `target` ("local", or the container's or the pod's, to test what ships)
    on loopback listeners, plus `settings` for this instance only; or the properties text `config`
    (see instance_config). `python` runs the launcher and so the workers (TorchServe passes its
    own interpreter on): another venv's python serves from that venv (the peer benchmark's).
    `env` adds variables to the server's environment, which its workers inherit.
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
    try:
        text = instance_config(ports, target, settings, config)
    except tsconfig.ConfigError as err:
        raise InputError(str(err)) from None
    instance.config_file.write_text(text, encoding="utf-8")

    environ = {k: v for k, v in os.environ.items() if k != "TS_CONFIG_FILE"}  # it would override --ts-config
    environ.update(env or {})
    # TMPDIR: the launcher's PID file; TEMP: the JVM's java.io.tmpdir, where worker sockets go.
    environ.update(TMPDIR=str(instance.tmp_dir), TEMP=str(instance.tmp_dir))
    environ.update(LOG_LOCATION=str(instance.log_dir), METRICS_LOCATION=str(instance.log_dir))
    command = [
        python, "-m", "ts.model_server", "--start", "--ncs",
        "--ts-config", str(instance.config_file),
        "--log-config", str(LOG_CONFIG_FILE),
        "--model-store", str(model_store),
    ]  # fmt: skip
    with instance.log_file.open("ab") as log:
        # The launcher starts the JVM and exits; the JVM keeps the log as its stdout. A new
        # session keeps a Ctrl-C in this terminal from reaching the server.
        launcher = subprocess.run(
            command,
            cwd=instance.dir,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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
    """Poll until /ping answers "Healthy" with the inference key; fail early if the JVM dies."""
    tokens = tokens_enabled(instance)

    def healthy() -> bool:
        # A JVM that failed to bind logs "Torchserve stopped." but does not exit.
        if STARTUP_FAILED in instance.log_file.read_text(errors="replace") or server_process(server) is None:
            raise ServeError(
                f"TorchServe failed to start; last lines of {instance.log_file}:\n{log_tail(instance)}"
            )
        headers = {}
        if tokens:
            if not instance.key_file.is_file():
                return False
            headers["Authorization"] = f"Bearer {read_keys(instance.key_file)['inference']['key']}"
        try:
            resp = requests.get(server.url("inference") + "/ping", headers=headers, timeout=5)
            return resp.ok and resp.json().get("status") == "Healthy"
        except (requests.RequestException, ValueError):
            return False  # not listening yet, or answering before it is ready

    try:
        wait_for(healthy, timeout, "/ping", interval=0.2)
    except WaitTimeout:
        raise ServeError(
            f"TorchServe did not answer /ping within {timeout:.0f}s; "
            f"last lines of {instance.log_file}:\n{log_tail(instance)}"
        ) from None


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


def read_keys(key_file: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The parsed key file. TorchServe rewrites it in place (at start and on renewal), so a read
    can catch it half-written: such reads are retried for up to `timeout` seconds (a loaded host
    can take seconds between the truncate and the write)."""

    def parsed() -> dict[str, Any] | None:
        try:
            return json.loads(key_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ServeError(
                f"no key file at {key_file}: TorchServe writes it into its working directory when it "
                f"starts; {START_HINT}, or pass --key-file"
            ) from None
        except json.JSONDecodeError:
            return None

    try:
        return wait_for(parsed, timeout, f"{key_file} to hold valid JSON")
    except WaitTimeout:
        raise ServeError(
            f"{key_file} is not valid JSON: pass the key_file.json of a running server"
        ) from None
