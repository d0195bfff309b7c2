"""Profile training steps under torch.profiler, DataLoader included: a Chrome trace and operator tables.

    python -m training.profile                                     # 5 warm-up + 30 profiled steps
    python -m training.profile model.width=48 data.num_workers=0   # any training.train override
    python -m training.profile --steps 10 --warmup 2 --out /tmp/prof experiment=accurate
    python -m training.profile --against trainer.fill_uninitialized_memory=true   # what a change buys

The config is composed from configs/ exactly as `python -m training.train` composes it, and the
model and data come from the same `training.train.build`, so the profile runs what training runs:
Lightning's fit loop, the DataLoader (its workers, prefetching and augmentation), forward,
backward and the optimiser step. Only the length changes: `--warmup` unrecorded steps (workers
start, oneDNN picks its kernels), then `--steps` recorded ones; no validation, checkpoint or logger.

Written to --out (default reports/profile/):
    training_trace.json     Chrome trace: open in chrome://tracing or https://ui.perfetto.dev
    training_ops.txt        top operators by self CPU time and by CPU memory allocated
    training_ops.csv        every operator: calls, CPU times, memory
    training_summary.md     step time, the share spent waiting for the DataLoader, top operators

With --against OVERRIDE (repeatable) nothing is profiled: the config with and without those
overrides is trained for the same steps, in turns, --rounds times each, timed without the profiler,
and training_compare.md gets both step times and their ratio. Taking turns in one run keeps the
load on a shared machine from favouring either side.

docs/profiling.md shows what these profiles found.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from training.cli import EXIT_USAGE, REPORTS_DIR, StageError, repo_path, run_stage
from training.config import CONFIG_DIR, check_ranges, register_configs
from training.data import MANIFEST

PROG = "python -m training.profile"
DEFAULT_OUT = REPORTS_DIR / "profile"
# torch.profiler names every DataLoader `next()` "enumerate(DataLoader)#<iterator class>.__next__".
LOADER_EVENT = "enumerate(DataLoader)"
STEP_EVENT = "ProfilerStep"


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """configs/train.yaml with command-line overrides, as training.train composes it; usage error if bad."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise StageError(
            f"bad override: {exc}; overrides take the form key=value, as for `python -m training.train`",
            exit_code=EXIT_USAGE,
        ) from None


def write_operator_tables(
    prof: torch.profiler.profile, out: Path, stem: str, top: int
) -> list[torch.autograd.profiler_util.FunctionEventAvg]:
    """<stem>_ops.txt (top `top` by self CPU time, then by CPU memory) and <stem>_ops.csv (all).

    Returns the operator averages sorted by self CPU time, most expensive first.
    """
    averages = prof.key_averages()
    tables = [
        (f"Top {top} operators by self CPU time", "self_cpu_time_total"),
        (f"Top {top} operators by CPU memory allocated (self)", "self_cpu_memory_usage"),
    ]
    text = "\n\n".join(f"{title}\n{averages.table(sort_by=key, row_limit=top)}" for title, key in tables)
    (out / f"{stem}_ops.txt").write_text(text + "\n", encoding="utf-8")
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    with (out / f"{stem}_ops.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["operator", "calls", "self_cpu_us", "cpu_total_us", "self_cpu_memory_bytes", "cpu_memory_bytes"]
        )
        for e in rows:
            writer.writerow(
                [
                    e.key,
                    e.count,
                    round(e.self_cpu_time_total, 1),
                    round(e.cpu_time_total, 1),
                    e.self_cpu_memory_usage,
                    e.cpu_memory_usage,
                ]  # fmt: skip
            )
    return rows


def top_ops_markdown(rows: Sequence[Any], top: int, skip: Sequence[str] = ()) -> str:
    """A markdown table of the `top` operators by self CPU time, with their share of all self time."""
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    lines = ["| operator | calls | self CPU (ms) | share | self CPU memory (MB) |", "|---|---|---|---|---|"]
    shown = [e for e in rows if not any(e.key.startswith(prefix) for prefix in skip)][:top]
    lines += [
        f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1000:.1f} | "
        f"{100 * e.self_cpu_time_total / total:.1f}% | {e.self_cpu_memory_usage / 2**20:.1f} |"
        for e in shown
    ]
    return "\n".join(lines)


class StepProfiler(Callback):
    """Advances the profiler's schedule after every training batch and shows progress."""

    def __init__(self, prof: torch.profiler.profile, warmup: int, steps: int) -> None:
        self.prof, self.warmup, self.total = prof, warmup, warmup + steps
        self.done = 0

    def on_train_batch_end(self, *_: Any) -> None:
        self.prof.step()
        self.done += 1
        phase = "warm-up" if self.done <= self.warmup else "profiled"
        print(f"\rstep {self.done}/{self.total} ({phase})", end="", file=sys.stderr, flush=True)
        if self.done == self.total:
            print(file=sys.stderr)


class StepTimer(Callback):
    """Wall-clock and CPU seconds of every training step after the first `warmup`.

    Wall time includes waiting for the DataLoader; CPU time is this process's (all its threads, not
    the loader's worker processes), which other processes on a busy machine cannot inflate.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, *_: Any) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def median_ms(self, clock: int) -> float:
        """Median milliseconds per step: clock 0 = wall, 1 = CPU."""
        ends = [end[clock] for end in self.ends[self.warmup - 1 :]]
        return statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False)) * 1000


def check_config(cfg: DictConfig) -> None:
    """Values in range, one process, and processed data present: say what to fix before the fit starts."""
    check_ranges(cfg)
    if cfg.trainer.devices * cfg.trainer.num_nodes != 1:
        raise StageError(
            "the profiler records one process: profile without trainer=ddp "
            "(or set trainer.devices=1 trainer.num_nodes=1)",
            exit_code=EXIT_USAGE,
        )
    root = repo_path(cfg.data.root)
    if not (root / "processed" / MANIFEST).is_file():
        raise StageError(
            f"no processed data under {root}: run `python -m training.data --out {root}` first "
            "(or point data.root= at the directory it wrote)",
            exit_code=EXIT_USAGE,
        )


def steps_only(cfg: DictConfig, steps: int, callback: Callback, out: Path) -> Any:
    """A Lightning Trainer with `cfg`'s settings that runs `steps` training steps and nothing else."""
    import lightning as L

    from training.train import trainer_settings

    # max_steps over as many epochs as needed (a small data set has few batches per epoch); no
    # validation, checkpoint or logger: they are not part of a training step.
    args = trainer_settings(cfg)
    args |= {"max_epochs": -1, "limit_train_batches": 1.0, "limit_val_batches": 0, "fast_dev_run": False}
    return L.Trainer(
        **args,
        max_steps=steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[callback],
        default_root_dir=str(out),
    )


def compare(
    overrides: Sequence[str], against: Sequence[str], out: Path, steps: int, warmup: int, rounds: int
) -> dict[str, Any]:
    """Median unprofiled step time of the config with and without `against`, trained in turns."""
    from training.train import build

    configs = {"base": compose_config(overrides), "changed": compose_config([*overrides, *against])}
    for cfg in configs.values():
        check_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in configs}
    for number in range(rounds):
        for name, cfg in configs.items():
            datamodule, module = build(cfg)
            timer = StepTimer(warmup)
            steps_only(cfg, warmup + steps, timer, out).fit(module, datamodule=datamodule)
            runs[name]["wall"].append(timer.median_ms(0))
            runs[name]["cpu"].append(timer.median_ms(1))
            print(
                f"round {number + 1}/{rounds} {name}: {runs[name]['wall'][-1]:.1f} ms/step wall, "
                f"{runs[name]['cpu'][-1]:.1f} ms/step CPU",
                file=sys.stderr,
            )
    median = {name: {clock: statistics.median(v) for clock, v in r.items()} for name, r in runs.items()}
    result = {
        "median_ms": median,
        "ratio": median["base"]["cpu"] / median["changed"]["cpu"],
        "ratio_wall": median["base"]["wall"] / median["changed"]["wall"],
    }
    command = shlex.join([*PROG.split(), *sys.argv[1:]])
    labels = {"base": "base " + " ".join(overrides), "changed": f"with `{' '.join(against)}`"}
    rows = "\n".join(
        f"| {labels[name]} | {m['cpu']:.1f} | {m['wall']:.1f} | {', '.join(f'{v:.0f}' for v in r['wall'])} |"
        for (name, m), r in zip(median.items(), runs.values(), strict=True)
    )
    (out / "training_compare.md").write_text(
        f"""# Training step time, with and without `{" ".join(against)}`

`{command}` on {time.strftime("%Y-%m-%d %H:%M")}, torch {torch.__version__}, load average
{", ".join(f"{x:.1f}" for x in os.getloadavg())} at the end. {rounds} rounds, taking turns; each run
{warmup} warm-up + {steps} timed steps, no profiler. Medians of the per-run medians; CPU time is the
training process's (all its threads), which other processes cannot inflate.

| config | CPU ms/step | wall ms/step | runs (wall ms/step) |
|---|---|---|---|
{rows}

base / changed = **{result["ratio"]:.2f}x** in CPU time, {result["ratio_wall"]:.2f}x in wall time
""",
        encoding="utf-8",
    )
    return result


def profile(cfg: DictConfig, out: Path, steps: int, warmup: int, top: int = 25) -> dict[str, Any]:
    """Run `warmup` + `steps` training steps of `cfg`, record the last `steps`, write the files into `out`.

    Returns the summary figures (also written to training_summary.md).
    """
    from training.train import build

    check_config(cfg)
    out.mkdir(parents=True, exist_ok=True)
    datamodule, module = build(cfg)
    trace = out / "training_trace.json"
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        # warmup: the profiler runs but drops its records, so its own start-up cost is not counted.
        schedule=torch.profiler.schedule(wait=warmup - 1, warmup=1, active=steps, repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(str(trace)),
        profile_memory=True,
    )
    t0 = time.perf_counter()
    with prof:
        trainer = steps_only(cfg, warmup + steps, StepProfiler(prof, warmup, steps), out)
        trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - t0
    if not trace.is_file():
        raise StageError(f"the profiler recorded nothing: fewer than {warmup + steps} training steps ran")
    rows = write_operator_tables(prof, out, "training", top)
    step_ms = [e.time_range.elapsed_us() / 1000 for e in prof.events() if e.name.startswith(STEP_EVENT)]
    loader_ms = sum(e.cpu_time_total for e in rows if e.key.startswith(LOADER_EVENT)) / 1000
    batch = cfg.data.batch_size
    summary = {
        "steps": len(step_ms),
        "step_ms_median": statistics.median(step_ms),
        "step_ms_mean": statistics.fmean(step_ms),
        "loader_share": loader_ms / sum(step_ms),
        "images_per_s": batch * len(step_ms) / (sum(step_ms) / 1000),
        "wall_s": seconds,
    }
    write_summary(out / "training_summary.md", cfg, summary, rows, top=15)
    return summary


def write_summary(
    path: Path, cfg: DictConfig, summary: dict[str, Any], rows: Sequence[Any], top: int
) -> None:
    from training.train import resolve_precision

    command = shlex.join([*PROG.split(), *sys.argv[1:]])
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    path.write_text(
        f"""# Training profile

`{command}` on {time.strftime("%Y-%m-%d %H:%M")}, torch {torch.__version__}, {torch.get_num_threads()}
torch threads, load average {", ".join(f"{x:.1f}" for x in os.getloadavg())}.
Model width {cfg.model.width}, depth {cfg.model.depth}; batch size {cfg.data.batch_size};
data.num_workers {cfg.data.num_workers}; augmentation {"on" if cfg.data.augment else "off"}; precision
{precision} (trainer.precision={cfg.trainer.precision}).

| profiled steps | step time, median | step time, mean | waiting for the DataLoader | images/s |
|---|---|---|---|---|
| {summary["steps"]} | {summary["step_ms_median"]:.1f} ms | {summary["step_ms_mean"]:.1f} ms | \
{100 * summary["loader_share"]:.1f}% | {summary["images_per_s"]:,.0f} |

Times are measured under the profiler, which adds its own overhead to every operator; compare
profiles with each other, not with unprofiled runs.

Top {top} operators by self CPU time (share of all self CPU time recorded):

{top_ops_markdown(rows, top, skip=(STEP_EVENT,))}
""",
        encoding="utf-8",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="profiled training steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="unrecorded steps before them (default 5)")
    parser.add_argument("--top", type=int, default=25, help="operators in each table (default 25)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (reports/profile)")
    parser.add_argument(
        "--against",
        action="append",
        metavar="OVERRIDE",
        help="time the config with and without this override instead of profiling (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns per side with --against (default 3)")
    parser.add_argument("overrides", nargs="*", help="training config overrides, e.g. model.width=48")
    args = parser.parse_args(None if argv is None else list(argv))
    if min(args.steps, args.warmup, args.top, args.rounds) < 1:
        parser.error("--steps, --warmup, --top and --rounds must be at least 1")

    def run() -> None:
        if args.against:
            result = compare(args.overrides, args.against, args.out, args.steps, args.warmup, args.rounds)
            print(
                f"base / with {' '.join(args.against)}: {result['ratio']:.2f}x in CPU time per step, "
                f"{result['ratio_wall']:.2f}x in wall time\n"
                f"written: {args.out / 'training_compare.md'}"
            )
            return
        cfg = compose_config(args.overrides)
        summary = profile(cfg, args.out, args.steps, args.warmup, args.top)
        print(
            f"{summary['steps']} steps: median {summary['step_ms_median']:.1f} ms/step, "
            f"{100 * summary['loader_share']:.1f}% waiting for the DataLoader, "
            f"{summary['images_per_s']:,.0f} images/s (under the profiler)\n"
            f"trace:   {args.out / 'training_trace.json'}  (chrome://tracing or ui.perfetto.dev)\n"
            f"tables:  {args.out / 'training_ops.txt'}, {args.out / 'training_summary.md'}"
        )

    return run_stage(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
