"""Where serving spends its time: the handler in-process, and a live TorchServe worker under load.

    python -m serving.profile handler --batch 8                  # stage breakdown + torch.profiler
    python -m serving.profile handler --batch 8 --against main   # end-to-end, this tree vs a git revision
    python -m serving.profile live --seconds 10 --clients 16     # py-spy flame graph of a loaded worker

`handler` loads the export (--model-dir, default artifacts/model) into the handler behind
TorchServe's own worker code (archive.selfcheck, no JVM) and answers batches of real test images:
  * a wall-clock breakdown per stage of a batch: TorchServe's frame decoding, request parsing, image
    decoding, preprocessing, the forward pass, postprocessing, the monitoring metrics, and
    TorchServe's JSON encoding of the answers, next to the end-to-end time of the same batches;
  * the same stages under torch.profiler: serving_handler_trace.json (Chrome trace) and
    serving_handler_ops.txt/.csv (top operators, stages included as record_function labels).
With --against REV the end-to-end time of this tree's handler/ and of REV's is measured in turns,
each in its own interpreter, and the ratio written to serving_handler_compare.md.

`live` starts a private TorchServe (serving.server) with the archive in --model-store, loads it
with the project's load generator (serving.loadgen) and records the worker with `py-spy record`:
serving_flame.svg (flame graph) and serving_live.md (throughput, latency, and the functions that
took the worker's time). py-spy (requirements-dev.txt) reads the worker's memory with ptrace: root,
or CAP_SYS_PTRACE in a container.

Everything goes to --out (default reports/profile/); docs/profiling.md shows what was found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from serving import MODEL_NAME, REPO
from serving.docblock import command, machine
from serving.server import ANY_PORTS, InputError, Instance, ServeError, exit_status, start, stop

PROG = "python -m serving.profile"
DEFAULT_OUT = REPO / "reports" / "profile"
DEFAULT_EXPORT = REPO / "artifacts" / "model"
DEFAULT_STORE = REPO / "model_store"
STAGES = (
    "frame decode", "parse", "decode", "preprocess", "forward", "postprocess", "metrics", "JSON encode",
)  # fmt: skip
PY_SPY_PIN = "py-spy==0.4.3"
# The handler's entry point as py-spy names it (with or without the class), after `_short`.
HANDLE_FRAMES = {"FashionMNISTHandler.handle (fashion_handler.py)", "handle (fashion_handler.py)"}


def sample_bodies(data: Path, count: int) -> list[bytes]:
    """Real test images as PNG (`python -m training.data`), else noise PNGs of the same size."""
    from serving.images import fashion_test_pngs, noise_pngs
    from training.data import DataError

    try:
        return fashion_test_pngs(data, count)
    except (OSError, DataError):
        return noise_pngs(count)


def load_export(model_dir: Path, batch: int) -> tuple[Any, Any]:
    """(TorchServe's Service, the handler behind it), initialised from an export like a worker does it."""
    from archive.selfcheck import export_service

    if not (model_dir / "model.pt").is_file():
        raise InputError(
            f"no exported model in {model_dir}: run `make train export` (or `python -m training.export`), "
            "or pass --model-dir"
        )
    return export_service(model_dir, batch)


def frames(bodies: Sequence[bytes], batch: int, count: int) -> list[bytes]:
    """`count` request frames of `batch` raw PNG bodies each, as the frontend sends them."""
    from archive.selfcheck import WorkerRequest, encode_batch

    requests = [WorkerRequest.raw(body, "application/octet-stream") for body in bodies]
    return [
        encode_batch([requests[(i * batch + j) % len(requests)] for j in range(batch)]) for i in range(count)
    ]


def end_to_end_us(
    service: Any, batch_frames: Sequence[bytes], clock: Callable = time.perf_counter
) -> list[float]:
    """Microseconds per request of each batch: frame decoding, the handler, the response frame.

    `clock`: wall time by default; time.process_time gives this process's CPU time, which other
    processes on a busy machine cannot inflate (a worker runs one torch thread, so CPU is its cost).
    """
    from ts.protocol.otf_message_handler import retrieve_msg

    from archive.selfcheck import _FrameSocket

    service.set_cl_socket(None)
    per_request = []
    for frame in batch_frames:
        t0 = clock()
        _, batch = retrieve_msg(_FrameSocket(frame))
        service.predict(batch)
        per_request.append((clock() - t0) * 1e6 / len(batch))
    return per_request


def stage_times(service: Any, handler: Any, batch_frames: Sequence[bytes], label: Callable) -> Counter:
    """CPU seconds per stage over all batches, running the handler's steps one by one.

    The steps are those of FashionMNISTHandler.handle for good requests, called in the same order on
    the same objects, then TorchServe's response encoding; `label(name)` is a context manager wrapped
    around each (torch.profiler's record_function, or a no-op).
    """
    import numpy as np
    import torch
    from ts.protocol.otf_message_handler import create_predict_response, retrieve_msg
    from ts.service import Service

    from archive.selfcheck import _FrameSocket
    from handler.payload import parse_request
    from handler.postprocess import encode_prediction, prediction_body, probabilities
    from handler.preprocess import decode_image, image_to_array, normalize

    ctx, spec, seconds = service.context, handler.spec, Counter()

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.process_time()
        with label(name):
            yield
        seconds[name] += time.process_time() - t0

    for frame in batch_frames:
        with stage("frame decode"):
            _, raw = retrieve_msg(_FrameSocket(frame))
            headers, rows, ids = Service.retrieve_data_for_inference(raw)
            ctx.request_ids, ctx.request_processor, ctx.metrics.request_ids = ids, headers, ids
        with stage("parse"):
            n = len(handler.classes)
            requests = [parse_request(row, ctx.get_all_request_header(i), n) for i, row in enumerate(rows)]
        with stage("decode"):
            images = [decode_image(request.image, spec) for request in requests]
        with stage("preprocess"):
            batch = normalize(torch.from_numpy(np.stack([image_to_array(img, spec) for img in images])), spec)
        with stage("forward"), torch.inference_mode():
            logits = handler.model(batch)
        with stage("postprocess"):
            probs = probabilities(logits)
            bodies = []
            for idx, (request, row) in enumerate(zip(requests, probs, strict=True)):
                ctx.set_response_content_type(idx, "application/json")
                bodies.append(prediction_body(row, handler.classes, request.top_k, handler.model_name, "1"))
        with stage("metrics"):
            if handler.monitor:
                handler.monitor.observe(batch, probs, list(ids.values()), spec)
            ctx.metrics.add_time("HandlerTime", 0.0, None, "ms")
        with stage("JSON encode"):
            create_predict_response([encode_prediction(body) for body in bodies], ids, "ok", 200, ctx)
    return seconds


def worker_logging() -> None:
    """Log like a TorchServe worker (INFO and up, the message alone), into /dev/null: the handler's
    prediction log then costs what it costs in a worker."""
    logging.basicConfig(stream=open(os.devnull, "w"), format="%(message)s", level=logging.INFO, force=True)  # noqa: SIM115


def profile_handler(model_dir: Path, data: Path, batch: int, batches: int, out: Path, top: int) -> dict:
    """The stage breakdown, the end-to-end time and the torch.profiler files for one batch size."""
    import torch

    from training.profile import write_operator_tables

    worker_logging()
    service, handler = load_export(model_dir, batch)
    batch_frames = frames(sample_bodies(data, 256), batch, batches)
    warm = batch_frames[: max(1, batches // 10)]
    end_to_end_us(service, warm)  # TorchScript's profiling executor settles during the first calls
    stage_times(service, handler, warm, lambda _: contextlib.nullcontext())
    # CPU time: a worker runs one torch thread, so its CPU time is what a request costs, and other
    # processes on a busy machine cannot inflate it (they do inflate wall time).
    half = len(batch_frames) // 2
    per_request = end_to_end_us(service, batch_frames[:half], time.process_time)
    seconds = stage_times(service, handler, batch_frames[:half], lambda _: contextlib.nullcontext())
    per_request += end_to_end_us(service, batch_frames[half:], time.process_time)
    seconds.update(stage_times(service, handler, batch_frames[half:], lambda _: contextlib.nullcontext()))
    requests = batch * len(batch_frames)
    stages = {name: seconds[name] * 1e6 / requests for name in STAGES if name in seconds}

    out.mkdir(parents=True, exist_ok=True)
    trace = out / "serving_handler_trace.json"
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        stage_times(service, handler, batch_frames[:half], torch.profiler.record_function)
    prof.export_chrome_trace(str(trace))
    rows = write_operator_tables(prof, out, "serving_handler", top)
    result = {
        "batch": batch,
        "requests": requests,
        "end_to_end_us": statistics.median(per_request),
        "stages_us": stages,
        "monitoring": handler.monitor is not None,
    }
    (out / "serving_handler_summary.md").write_text(render_handler(result, rows), encoding="utf-8")
    return result


def render_handler(result: dict, rows: Sequence[Any]) -> str:
    from training.profile import top_ops_markdown

    stages = result["stages_us"]
    total = sum(stages.values())
    lines = "\n".join(
        f"| {name} | {us:.1f} | {100 * us / total:.1f}% |"
        for name, us in sorted(stages.items(), key=lambda x: -x[1])
    )
    return f"""# Handler profile

`{command(PROG.split(), sys.argv[1:])}` on {time.strftime("%Y-%m-%d %H:%M")}, {machine()}.
Batches of {result["batch"]} PNG-encoded 28x28 test images, {result["requests"]:,} requests per
figure, monitoring {"on" if result["monitoring"] else "off"}, 1 torch thread (as in a worker).

All figures are CPU time of this single-threaded process, which other processes cannot inflate.
End to end (TorchServe's frame decoding, the handler, the response frame), median over batches:
**{result["end_to_end_us"]:.1f} CPU µs per request**.

Per stage, running the handler's steps one by one (CPU µs per request; sum {total:.1f} µs):

| stage | CPU µs per request | share |
|---|---|---|
{lines}

Top operators and stages under torch.profiler (self CPU time; stages are record_function labels):

{top_ops_markdown(rows, 15)}
"""


def time_handler(model_dir: Path, data: Path, batch: int, batches: int) -> None:
    """Serve timing requests on stdin for the `handler` package this interpreter imports: each line
    "N" runs the next N batches and answers one JSON line with their µs per request."""
    worker_logging()
    service, _ = load_export(model_dir, batch)
    batch_frames = frames(sample_bodies(data, 256), batch, batches)
    end_to_end_us(service, batch_frames[: max(1, batches // 10)])  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    position = 0
    for line in sys.stdin:
        chunk = [batch_frames[(position + i) % batches] for i in range(int(line))]
        position += len(chunk)
        wall = end_to_end_us(service, chunk)
        cpu = end_to_end_us(service, chunk, time.process_time)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def compare_handler(
    model_dir: Path, data: Path, batch: int, batches: int, rev: str, rounds: int, out: Path
) -> dict[str, Any]:
    """End-to-end µs per request of this tree's handler/ and of `rev`'s, side by side.

    Each runs in its own interpreter (everything but handler/ imported from this tree), loaded once;
    they then take turns, `rounds` turns each of `batches / rounds` batches, so both sample the
    same stretch of time and a change of machine load cannot favour either.
    """
    if not (model_dir / "model.pt").is_file():
        load_export(model_dir, batch)  # raises the missing-export error
    with tempfile.TemporaryDirectory(prefix="handler-rev-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", rev, "handler"], capture_output=True
        )
        if archive.returncode != 0:
            raise InputError(f"git cannot read handler/ at {rev!r}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        # -P: the working directory is not put first on sys.path, so PYTHONPATH decides which
        # handler/ is imported.
        timer = [
            sys.executable, "-P", "-m", "serving.profile", "time-handler", "--model-dir", str(model_dir),
            "--data", str(data), "--batch", str(batch), "--batches", str(batches),
        ]  # fmt: skip
        paths = {rev: f"{tmp}{os.pathsep}{REPO}", "this tree": str(REPO)}
        sides = {
            name: subprocess.Popen(
                timer,
                env={**os.environ, "PYTHONPATH": path},
                cwd=tmp,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for name, path in paths.items()
        }
        try:
            for name, proc in sides.items():
                _answer(name, proc)  # loaded and warmed up
            samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in sides}
            chunk = max(1, batches // rounds)
            for number in range(rounds):
                for name, proc in sides.items():
                    proc.stdin.write(f"{chunk}\n")
                    proc.stdin.flush()
                    for clock, values in _answer(name, proc).items():
                        samples[name][clock] += values
                print(f"turn {number + 1}/{rounds} done", file=sys.stderr)
        finally:
            for proc in sides.values():
                proc.kill()
                proc.wait()
    # Medians per side, of CPU time (what a request costs the worker, whatever else runs) and of wall
    # time (what it costs here and now, preemptions by other processes included).
    median = {name: {clock: statistics.median(v) for clock, v in s.items()} for name, s in samples.items()}
    result = {
        "median_us": median,
        "ratio": median[rev]["cpu"] / median["this tree"]["cpu"],
        "ratio_wall": median[rev]["wall"] / median["this tree"]["wall"],
        "rev": rev,
    }
    rows = "\n".join(f"| {name} | {m['cpu']:.1f} | {m['wall']:.1f} |" for name, m in median.items())
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_handler_compare.md").write_text(
        f"""# Handler end to end: this tree against `{rev}`

`{command(PROG.split(), sys.argv[1:])}` on {time.strftime("%Y-%m-%d %H:%M")}, {machine()}.
Batches of {batch} PNG test images through TorchServe's worker code and the handler; each side in its
own interpreter, taking {rounds} turns of {chunk} batches, each batch timed once by CPU time and once
by wall time; medians over every batch of a side, µs per request.

| handler/ | CPU µs per request | wall µs per request |
|---|---|---|
{rows}

{rev} / this tree = **{result["ratio"]:.2f}x** in CPU time, {result["ratio_wall"]:.2f}x in wall time
""",
        encoding="utf-8",
    )
    return result


def _answer(name: str, proc: subprocess.Popen) -> dict[str, Any]:
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise ServeError(f"timing the handler of {name} failed:\n{proc.stderr.read()[-2000:]}")
    return json.loads(line)


# --- live: py-spy on a worker under load ---------------------------------------------------------


def py_spy() -> str:
    """The py-spy executable next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise InputError(f"py-spy is not installed: `pip install {PY_SPY_PIN}` (requirements-dev.txt)")
    return found


def record(pid: int, seconds: float, rate: int, out: Path) -> tuple[Path, Path]:
    """A flame graph (SVG) and collapsed stacks (text) of `pid`, sampled by two py-spy at once.

    --nonblocking: the worker is read without being stopped, so the profile costs it no throughput.
    """
    svg, raw = out / "serving_flame.svg", out / "serving_stacks.txt"
    base = [py_spy(), "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", str(rate)]
    base += ["--nonblocking"]
    procs = [
        subprocess.Popen(
            [*base, "--format", fmt, "--output", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for fmt, path in (("flamegraph", svg), ("raw", raw))
    ]
    outputs = [proc.communicate(timeout=seconds + 60)[0].decode(errors="replace") for proc in procs]
    for proc, text in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            if "Permission denied" in text or "Operation not permitted" in text:
                raise ServeError(
                    f"py-spy may not read process {pid}: it needs ptrace. Run as root, add CAP_SYS_PTRACE "
                    "(docker run --cap-add SYS_PTRACE), or set kernel.yama.ptrace_scope=0.\n" + text[-500:]
                )
            raise ServeError(f"py-spy record failed:\n{text[-1500:]}")
    return svg, raw


def stack_shares(raw: Path) -> dict[str, Any]:
    """Collapsed stacks -> samples, self and inclusive samples per function, and the direct callees
    of the handler's `handle` (where a batch's time goes)."""
    self_samples, inclusive, callees = Counter(), Counter(), Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(frame) for frame in stack.split(";")]
        self_samples[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
        for caller, callee in zip(frames, frames[1:], strict=False):
            if caller in HANDLE_FRAMES:
                callees[callee] += n
    return {"total": total, "self": self_samples, "inclusive": inclusive, "handle_callees": callees}


def _short(frame: str) -> str:
    """'Cls.f (/long/path/to/file.py:12)' -> 'Cls.f (file.py)': one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')')).name.rsplit(':', 1)[0]})" if where else frame


def profile_live(
    store: Path, data: Path, seconds: float, clients: int, rate: int, out: Path, settings: dict[str, int]
) -> dict[str, Any]:
    """Serve `store`'s archive, load it with `clients` closed-loop clients, record the worker."""
    from serving.client import Client
    from serving.loadgen import drive

    if not (store / f"{MODEL_NAME}.mar").is_file():
        raise InputError(f"no {MODEL_NAME}.mar in {store}: run `make archive`, or pass --model-store")
    py_spy()
    out.mkdir(parents=True, exist_ok=True)
    bodies = sample_bodies(data, 256)
    with tempfile.TemporaryDirectory(prefix="prof-", dir="/tmp") as state:
        instance = Instance("profile", Path(state))
        # No tokens: the key check runs in the frontend, not in the worker that is recorded, and
        # TorchServe's key file, rewritten in place, can stay unreadable for seconds on a busy machine.
        start(instance, store, ANY_PORTS, settings={"disable_token_authorization": "true"})
        try:
            # Registration returns once the worker has loaded the model: minutes on a busy machine.
            client = Client.for_instance(instance, timeout=600)
            client.register(**settings)
            described = client.describe()[0]
            pid = described["workers"][0]["pid"]
            url = f"{client.urls['inference']}/predictions/{MODEL_NAME}"
            headers = {"Content-Type": "application/octet-stream"}
            drive(url, headers, bodies, clients, 1.0)  # warm-up: the worker's first batches
            samples: list = []
            halt = threading.Event()
            load = threading.Thread(
                target=drive,
                args=(url, headers, bodies, clients, seconds + 120),
                kwargs={"stop": halt, "sink": samples},
            )
            load.start()
            try:
                t0 = time.perf_counter()
                svg, raw = record(pid, seconds, rate, out)
                elapsed = time.perf_counter() - t0
            finally:
                halt.set()
                load.join()
            client.close()
        finally:
            stop(instance)
    statuses = Counter(s.status for s in samples)
    latencies = sorted(s.latency * 1000 for s in samples if s.status == 200)
    result = {
        "settings": {k: described[k] for k in ("batchSize", "maxBatchDelay")}
        | {"workers": len(described["workers"])},
        "requests": len(samples),
        "rps": len(samples) / elapsed,
        "statuses": dict(statuses),
        "p50_ms": latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "clients": clients,
        "seconds": seconds,
        "rate": rate,
        "stacks": stack_shares(raw),
        "svg": str(svg),
    }
    (out / "serving_live.md").write_text(render_live(result), encoding="utf-8")
    return result


def render_live(result: dict[str, Any]) -> str:
    stacks = result["stacks"]
    total = stacks["total"] or 1

    def table(counter: Counter, top: int) -> str:
        return "\n".join(f"| `{name}` | {100 * n / total:.1f}% |" for name, n in counter.most_common(top))

    settings = result["settings"]
    return f"""# Live worker profile (py-spy)

`{command(PROG.split(), sys.argv[1:])}` on {time.strftime("%Y-%m-%d %H:%M")}, {machine()}.
{settings["workers"]} worker(s), py-spy on the first; batch size {settings["batchSize"]},
max batch delay {settings["maxBatchDelay"]} ms;
{result["clients"]} closed-loop keep-alive clients (serving.loadgen) for the {result["seconds"]:g} s of the
recording: {result["requests"]:,} requests, {result["rps"]:.0f} req/s, p50 {result["p50_ms"]:.1f} ms,
p99 {result["p99_ms"]:.1f} ms, statuses {result["statuses"]} (py-spy samples without stopping the worker).

{stacks["total"]:,} samples of the worker at {result["rate"]} Hz, idle time excluded. Flame graph:
`serving_flame.svg`.

Where `handle` (FashionMNISTHandler.handle) spends its samples, by direct callee (share of all samples):

| callee of handle | share |
|---|---|
{table(stacks["handle_callees"], 12)}

Functions by inclusive samples (the function and everything it called):

| function | share |
|---|---|
{table(stacks["inclusive"], 25)}

Functions by self samples (time in the function's own code):

| function | share |
|---|---|
{table(stacks["self"], 15)}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, default=REPO / "data", help="root of `python -m training.data`")
    common.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (reports/profile)")
    handler = sub.add_parser(
        "handler", parents=[common], help="the handler in-process: stages + torch.profiler"
    )
    timing = sub.add_parser("time-handler", parents=[common], help="(used by --against) timings on stdin")
    for p in (handler, timing):
        p.add_argument("--model-dir", type=Path, default=DEFAULT_EXPORT, help="an export (artifacts/model)")
        p.add_argument("--batch", type=int, default=8, help="requests per batch (default 8)")
        p.add_argument("--batches", type=int, default=400, help="batches per figure (default 400)")
    handler.add_argument("--top", type=int, default=25, help="operators in each table (default 25)")
    handler.add_argument(
        "--against", metavar="REV", help="compare end to end with handler/ at this git revision"
    )
    handler.add_argument("--rounds", type=int, default=20, help="turns per side with --against (default 20)")
    live = sub.add_parser("live", parents=[common], help="py-spy flame graph of a worker under load")
    live.add_argument("--model-store", type=Path, default=DEFAULT_STORE, help="holds fashion_mnist.mar")
    live.add_argument("--seconds", type=float, default=10.0, help="recording length (default 10)")
    live.add_argument("--clients", type=int, default=16, help="closed-loop clients (default 16)")
    live.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    live.add_argument("--batch-size", type=int, help="override the archive's batch size")
    live.add_argument("--max-batch-delay", type=int, help="override the archive's delay (ms)")
    args = parser.parse_args(None if argv is None else list(argv))
    numbers = [getattr(args, name, 1) for name in ("batch", "batches", "top", "rounds", "clients", "rate")]
    if min(numbers) < 1 or getattr(args, "seconds", 1) <= 0:
        parser.error("counts, --seconds and --rate must be positive")

    import torch

    torch.set_num_threads(1)  # a worker's setting (handler.fashion_handler.configure_threads)
    try:
        if args.command == "time-handler":
            time_handler(args.model_dir, args.data, args.batch, args.batches)
        elif args.command == "handler" and args.against:
            r = compare_handler(
                args.model_dir, args.data, args.batch, args.batches, args.against, args.rounds, args.out
            )
            print(
                f"{args.against} / this tree: {r['ratio']:.2f}x in CPU time per request, "
                f"{r['ratio_wall']:.2f}x in wall time\n"
                f"written: {args.out / 'serving_handler_compare.md'}"
            )
        elif args.command == "handler":
            r = profile_handler(args.model_dir, args.data, args.batch, args.batches, args.out, args.top)
            stages = ", ".join(f"{name} {us:.0f}" for name, us in r["stages_us"].items())
            print(
                f"end to end {r['end_to_end_us']:.1f} µs/request; stages (µs/request): {stages}\n"
                f"written: {args.out / 'serving_handler_summary.md'}, serving_handler_ops.txt, "
                "serving_handler_trace.json"
            )
        else:
            settings = {"batch_size": args.batch_size, "max_batch_delay": args.max_batch_delay}
            r = profile_live(
                args.model_store, args.data, args.seconds, args.clients, args.rate, args.out,
                {k: v for k, v in settings.items() if v is not None},
            )  # fmt: skip
            print(
                f"{r['requests']:,} requests at {r['rps']:.0f} req/s, {r['stacks']['total']:,} samples\n"
                f"written: {r['svg']}, {args.out / 'serving_live.md'}"
            )
    except ServeError as err:
        return exit_status(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
