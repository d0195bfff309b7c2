"""Run a local TorchServe and talk to it through its REST APIs (the command line of serving/).

    python -m scripts.serve start                  # waits until the server answers /ping
    python -m scripts.serve register               # model_store/fashion_mnist.mar via the management API
    python -m scripts.serve deploy model_store/fashion_mnist.mar   # its version beside the others, as default
    python -m scripts.serve set-default 3f2a9c01b7de               # rollback: one call
    python -m scripts.serve predict shirt.png pics/   # a top-k table, one row per image
    python -m scripts.serve scale --min-workers 2 --max-workers 2
    python -m scripts.serve status
    python -m scripts.serve unregister
    python -m scripts.serve stop                   # returns once the JVM and its workers have exited

Every server is an *instance* (--instance, default "default") with its own directory under
--state-dir (default .serve/ in the repository); serving/server.py describes what is in it. Ports
come from the flags of `start` or FASHION_SERVE_<NAME>_PORT (0 = any free port). Keys are read from
the instance's key_file.json and renewed when they have expired. Default paths are resolved from
the repository root, wherever the command runs. Exit status: 0 on success, 2 for bad input
(a missing file, a bad flag), 1 for any other failure, with an explanation on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from serving import MODEL_NAME
from serving.client import Client, KeyRefused, RequestFailed, archive_identity, deploy
from serving.server import (
    DEFAULT_PORTS,
    DEFAULT_STATE_ROOT,
    HOST,
    InputError,
    Instance,
    ServeError,
    exit_status,
    start,
    stop,
)
from serving.tsconfig import TARGETS
from training.cli import MODEL_STORE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """The given files, and the images (by suffix) under the given directories, sorted."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            yield path
        else:
            raise InputError(f"{path} does not exist")


def label_slug(label: str) -> str:
    """A class name as it appears in a sample's file name (training.data --samples)."""
    return label.replace("/", "-").replace(" ", "-")


def truth_from_name(path: Path) -> str:
    """ "test00012_Ankle-boot.png" -> "Ankle-boot" (the label slug after the first underscore)."""
    return path.stem.partition("_")[2] or "?"


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
    server = start(instance, args.model_store, ports, timeout=args.timeout, target=args.target)
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
        default = client.default_version(entry["modelName"])
        for version in client.describe(f"{entry['modelName']}/all"):
            workers = version["workers"]
            ready = sum(w["status"] == "READY" for w in workers)
            mark = " (default)" if version["modelVersion"] == default else ""
            print(
                f"  {version['modelName']} {version['modelVersion']}{mark}: {ready}/{len(workers)} workers "
                f"ready (min {version['minWorkers']}, max {version['maxWorkers']}), "
                f"batchSize {version['batchSize']}, maxBatchDelay {version['maxBatchDelay']} ms"
            )
    return 0 if health == "Healthy" else 1


def cmd_register(args: argparse.Namespace, instance: Instance) -> int:
    reply = make_client(args, instance).register(
        args.archive, args.batch_size, args.max_batch_delay, args.initial_workers
    )
    print(reply["status"])
    return 0


def cmd_deploy(args: argparse.Namespace, instance: Instance) -> int:
    if not args.archive.is_file():
        raise InputError(
            f"{args.archive} does not exist: build it with `python -m archive.build` (or `dvc repro`)"
        )
    archive_identity(args.archive)  # a bad file is an input error, whether or not a server runs
    client = make_client(args, instance)
    name, version, registered_now = deploy(client, args.archive)
    others = [v for v in client.versions(name) if v != version]
    print(f"{name} {version} {'registered and ' if registered_now else ''}serving as the default")
    if others:
        rollback = "python -m scripts.serve set-default VERSION"
        print(f"  also registered: {', '.join(others)} (rollback: {rollback})")
    return 0


def cmd_set_default(args: argparse.Namespace, instance: Instance) -> int:
    print(make_client(args, instance).set_default(args.version, args.model)["status"])
    return 0


def cmd_unregister(args: argparse.Namespace, instance: Instance) -> int:
    print(make_client(args, instance).unregister(args.model)["status"])
    return 0


def cmd_scale(args: argparse.Namespace, instance: Instance) -> int:
    if not 0 <= args.min_workers <= args.max_workers:
        raise InputError(
            f"need 0 <= --min-workers <= --max-workers, got {args.min_workers}, {args.max_workers}"
        )
    print(make_client(args, instance).scale(args.min_workers, args.max_workers, args.model)["status"])
    return 0


def cmd_predict(args: argparse.Namespace, instance: Instance) -> int:
    files = list(image_files(args.paths))
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"no images ({suffixes}) in {', '.join(map(str, args.paths))}")
    client = make_client(args, instance)
    rows, refused, correct = [], 0, 0
    for path in files:
        cells = [str(path)]
        try:
            labels = client.predict(path.read_bytes(), args.model, args.top_k).predictions
        except RequestFailed as err:
            if err.status not in (400, 413) or isinstance(err, KeyRefused):
                raise  # not about this image: no model, no worker, a bad key
            labels, answer = (), [f"HTTP {err.status} {err.kind}: {err.detail}"]
        else:
            answer = [f"{p.label} {p.probability:.3f}" for p in labels[: args.top_k]]
        if args.truth_from_name:
            truth = truth_from_name(path)
            hit = bool(labels) and label_slug(labels[0].label) == truth
            correct += hit
            cells += [truth, "yes" if hit else "NO"]
        rows.append(([*cells, *answer], bool(labels)))
        refused += not labels
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
        raise InputError(f"{variable} must be a port number, got {raw!r}") from None


def server_url(value: str) -> str:
    """argparse type: an http(s) URL with a host, so a typo is a usage error, not a requests traceback."""
    parts = urlsplit(value)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # the port is not a number from 0 to 65535
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a server URL; give one like http://127.0.0.1:8080"
        )
    return value.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--instance", default=os.environ.get("FASHION_SERVE_INSTANCE", "default"),
        help="server instance (env FASHION_SERVE_INSTANCE, default: default)",
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("FASHION_SERVE_STATE_DIR", DEFAULT_STATE_ROOT)),
        help="where instance directories live (env FASHION_SERVE_STATE_DIR, default: .serve/ in the repo)",
    )  # fmt: skip
    parser.add_argument(
        "--inference-url", type=server_url, help="talk to this server instead of the instance's"
    )
    parser.add_argument(
        "--management-url", type=server_url, help="talk to this server instead of the instance's"
    )
    parser.add_argument("--key-file", help="TorchServe key_file.json (default: the instance's)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="start TorchServe and wait until it answers /ping")
    p.add_argument("--model-store", type=Path, default=MODEL_STORE, help="default: model_store/")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument(
        "--target", choices=TARGETS, default="local",
        help="run this target's TorchServe settings (serving.tsconfig), on loopback (default: local)",
    )  # fmt: skip
    for name in DEFAULT_PORTS:
        p.add_argument(
            f"--{name.replace('_', '-')}-port", type=int, default=env_port(name),
            help=f"(env FASHION_SERVE_{name.upper()}_PORT, default {DEFAULT_PORTS[name]}; 0 = any free port)",
        )  # fmt: skip
    p.set_defaults(run=cmd_start)

    p = sub.add_parser("stop", help="stop TorchServe and wait until it has exited")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before the remains are killed")
    p.set_defaults(run=cmd_stop)

    p = sub.add_parser("status", help="health, models, every version (the default marked), workers")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("register", help="register an archive from the model store")
    p.add_argument("archive", nargs="?", default=f"{MODEL_NAME}.mar", help="file name inside the model store")
    p.add_argument("--batch-size", type=int, help="override the archive's batchSize")
    p.add_argument("--max-batch-delay", type=int, help="override the archive's maxBatchDelay (ms)")
    p.add_argument("--initial-workers", type=int, help="workers, if the archive sets no minWorkers")
    p.set_defaults(run=cmd_register)

    p = sub.add_parser("deploy", help="register an archive's version beside the others, as the default")
    p.add_argument("archive", type=Path, help="a .mar inside the server's model store")
    p.set_defaults(run=cmd_deploy)

    p = sub.add_parser("set-default", help="make a registered version the default (a rollback)")
    p.add_argument("version")
    p.add_argument("--model", default=MODEL_NAME)
    p.set_defaults(run=cmd_set_default)

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
        return exit_status(err)


if __name__ == "__main__":
    sys.exit(main())
