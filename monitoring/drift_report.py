"""HTML drift report: a window of the prediction log against the training reference in model_meta.json.

  python -m monitoring.drift_report --log .serve/default/logs/predictions.log
  python -m monitoring.drift_report --log predictions.log --since 2026-12-01T14:00Z --until 2026-12-01T15:00Z
  python -m monitoring.drift_report --log stdout.log --last 500 --meta M/model_meta.json --out r/x.html

Reads the JSON lines handler/monitor.py writes (other lines, such as TorchServe's own in a
container's stdout, are skipped), keeps those of the model and version in --meta, cuts the
window (--since/--until on the `time` field, then the --last N), and compares it with the
reference that export recorded, using Evidently (docs/monitoring.md says why Evidently). Each
input statistic and the top-1 confidence are compared in the bins the server counts them in
(the reference histograms), so the report's PSI is the one the InputDrift rule computes; the
predicted class is compared with the training class mix. Writes the HTML report (--out,
default reports/drift_report.html) and the per-column scores next to it as JSON, and prints them.
Exit status: 0 whether or not there is drift; 2 with a message for a missing, empty or
malformed log, an empty window or a model export without reference histograms.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

from handler.monitor import FEATURES, PREDICTION_PREFIX, MonitorSpec
from monitoring.rules import SERVED_META, RulesError, Thresholds, load_meta, reference

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "reports" / "drift_report.html"
# The reference is rebuilt from histogram counts, scaled to this many rows: shares exact to 1e-4.
REFERENCE_ROWS = 10_000
NUMBERS = (*FEATURES, "confidence")
COLUMNS = [f"{name}_bin" for name in NUMBERS] + ["label"]


class LogError(ValueError):
    """The log or the window cannot be compared; the message says what to do."""


@dataclass(frozen=True)
class Window:
    """Which records of the log to compare: a time range, then the most recent `last` of it."""

    since: datetime | None = None
    until: datetime | None = None
    last: int | None = None


def parse_time(text: str) -> datetime:
    """ISO 8601 as the log writes it (2026-12-01T14:16:56.367Z); a time without zone is UTC."""
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _record(line: str, number: int, path: Path) -> dict[str, Any]:
    """One prediction line -> its record, checked; a LogError names the line and what is wrong."""
    try:
        record = json.loads(line)
        record["time"] = parse_time(record["time"])
        for name in NUMBERS:
            value = float(record[name])
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} is {record[name]!r}, not a number in [0, 1]")
            record[name] = value
        for name in ("model", "version", "label"):
            if not isinstance(record[name], str):
                raise ValueError(f"{name} is {record[name]!r}, not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise LogError(
            f"{path}:{number} is not a valid prediction record ({reason}); --log must be the prediction "
            "log the server writes (JSON lines from handler/monitor.py, see docs/monitoring.md)"
        ) from None
    return record


def read_log(path: Path, meta: Mapping[str, Any], window: Window) -> list[dict[str, Any]]:
    """The window's prediction records of the model in `meta`, oldest first."""
    if not path.is_file():
        raise LogError(
            f"{path} not found; a local server writes .serve/<instance>/logs/predictions.log "
            "(`python -m scripts.serve start`), a container writes the lines to its stdout "
            "(`docker logs CONTAINER > predictions.log`); pass that file as --log"
        )
    records, others, versions = [], 0, set()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.startswith(PREDICTION_PREFIX):
                others += 1
                continue
            record = _record(line, number, path)
            versions.add((record["model"], record["version"]))
            if (record["model"], record["version"]) == (meta["name"], str(meta["version"])):
                records.append(record)
    model = f"{meta['name']} {meta['version']}"
    if not versions:
        raise LogError(
            f"{path} has no prediction lines ({others} other lines); send the server some requests, "
            f"or pass the predictions.log it writes as --log (its lines start with {PREDICTION_PREFIX})"
        )
    if not records:
        found = ", ".join(f"{m} {v}" for m, v in sorted(versions))
        raise LogError(f"{path} has predictions of {found}, none of {model}; pass that archive's --meta")
    records.sort(key=lambda r: r["time"])
    chosen = [
        r
        for r in records
        if (window.since is None or r["time"] >= window.since)
        and (window.until is None or r["time"] < window.until)
    ]
    if window.last is not None:
        chosen = chosen[-window.last :]
    if not chosen:
        raise LogError(
            f"no predictions of {model} in the window (the log spans {records[0]['time'].isoformat()} to "
            f"{records[-1]['time'].isoformat()}); widen --since/--until"
        )
    return chosen


def _bin_labels(edges: Sequence[float]) -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _scaled(counts: Sequence[int], rows: int) -> list[int]:
    """Counts scaled to sum to `rows`, largest remainders rounded up, so every share is kept."""
    total = sum(counts)
    exact = [c * rows / total for c in counts]
    scaled = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: scaled[i] - exact[i])[: rows - sum(scaled)]:
        scaled[i] += 1
    return scaled


def reference_frame(meta: Mapping[str, Any], rows: int = REFERENCE_ROWS) -> pd.DataFrame:
    """The training reference as rows: each column repeats its bin labels in the recorded shares.

    Only per-column shares matter to a drift test, so each column is built on its own.
    """
    ref = reference(dict(meta))  # validates the histograms; says how to re-export without them
    hists = meta["reference_stats"]["histograms"]
    columns = {}
    for name in NUMBERS:
        labels = _bin_labels(hists[name]["edges"])
        counts = _scaled(hists[name]["counts"], rows)
        columns[f"{name}_bin"] = [label for label, n in zip(labels, counts, strict=True) for _ in range(n)]
    counts = _scaled(meta["reference_stats"]["class_counts"], rows)
    columns["label"] = [name for name, n in zip(ref["classes"], counts, strict=True) for _ in range(n)]
    return pd.DataFrame(columns)


def current_frame(records: Iterable[Mapping[str, Any]], spec: MonitorSpec) -> pd.DataFrame:
    """Log records -> the same columns as the reference: the bin the server counted each value in."""
    records = list(records)
    columns: dict[str, list[str]] = {}
    for name in NUMBERS:
        labels = _bin_labels(spec.edges[name])
        columns[f"{name}_bin"] = [labels[i] for i in spec.bins(name, [r[name] for r in records])]
    columns["label"] = [r["label"] for r in records]
    return pd.DataFrame(columns)


def compare(
    meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]], out: Path, limits: Thresholds
) -> dict[str, Any]:
    """Run Evidently's drift preset (PSI, the rules' threshold); write the HTML and the JSON summary."""
    definition = DataDefinition(categorical_columns=COLUMNS)
    current = Dataset.from_pandas(
        current_frame(records, MonitorSpec.from_stats(meta.get("reference_stats", {}))),
        data_definition=definition,
    )
    reference_data = Dataset.from_pandas(reference_frame(meta), data_definition=definition)
    snapshot = Report([DataDriftPreset(method="psi", threshold=limits.psi)]).run(
        current_data=current, reference_data=reference_data
    )
    scores = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            scores[config["column"]] = float(metric["value"])
    summary = {
        "model": {"name": meta["name"], "version": str(meta["version"])},
        "requests": len(records),
        "from": records[0]["time"].isoformat(),
        "to": records[-1]["time"].isoformat(),
        "psi_threshold": limits.psi,
        "psi": {column: round(score, 6) for column, score in scores.items()},
        "drifted": sorted(column for column, score in scores.items() if score >= limits.psi),
        "input_drift": any(scores[f"{name}_bin"] >= limits.psi for name in FEATURES),
        "html": str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.drift_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--log", type=Path, required=True, help="the prediction log (JSON lines)")
    parser.add_argument(
        "--meta", type=Path, default=SERVED_META, help="the served .mar, or a model_meta.json of that model"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="HTML report; its .json goes next to it"
    )
    parser.add_argument("--since", type=parse_time, help="first time in the window (ISO 8601, UTC)")
    parser.add_argument("--until", type=parse_time, help="end of the window, exclusive (ISO 8601, UTC)")
    parser.add_argument("--last", type=int, help="only the most recent N predictions of the window")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error("--last must be at least 1")
    limits = Thresholds()
    try:
        meta = load_meta(args.meta)
        records = read_log(args.log, meta, Window(args.since, args.until, args.last))
        summary = compare(meta, records, args.out, limits)
    except FileNotFoundError:
        print(
            f"error: {args.meta} not found; build the archive (`python -m archive.build`) or pass --meta",
            file=sys.stderr,
        )
        return 2
    except (LogError, RulesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyError, json.JSONDecodeError) as err:
        print(
            f"error: {args.meta} is not an export's model_meta.json ({err}); pass the right --meta",
            file=sys.stderr,
        )
        return 2
    if summary["requests"] < limits.min_requests:
        print(
            f"note: {summary['requests']} requests; below the alerts' minimum of {limits.min_requests} "
            "the scores are mostly sampling noise",
            file=sys.stderr,
        )
    model = f"{meta['name']} {meta['version']}"
    print(f"{summary['requests']} predictions of {model}, {summary['from']} to {summary['to']}")
    for column, score in summary["psi"].items():
        flag = "DRIFT" if column in summary["drifted"] else "ok"
        print(f"  {column:<18} PSI {score:8.4f}  {flag}")
    verdict = "input drift" if summary["input_drift"] else "no input drift"
    print(f"{verdict} (PSI threshold {limits.psi}); report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
