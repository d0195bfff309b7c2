"""Generate the Prometheus recording and alerting rules from the served model's model_meta.json.

    python -m monitoring.rules                                               # model_store/fashion_mnist.mar
    python -m monitoring.rules --meta artifacts/model/model_meta.json       # an export's (fp32 archives)
    python -m monitoring.rules --gke deploy/overlays/gke/rules.yaml         # also the GMP Rules resource
    python -m monitoring.rules --window 30s --for 5s --out /tmp/r.yml       # short windows (tests)

The training reference (the share of training images in each input-statistic bin, the training
class mix, the held-out low-confidence share) becomes constants in the rules, so a new model
brings new rules: regenerate them with every export. The metric names and bins are the ones the
handler emits (handler/monitor.py). docs/monitoring.md explains each rule and alert, and how the
thresholds below were chosen. Exit status: 0, or 2 with a message when the metadata lacks the
reference histograms (re-export with `python -m training.export`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from handler.monitor import CONFIDENCE, FEATURES, INPUT, PREDICTIONS, WORKER_STARTS

REPO = Path(__file__).resolve().parent.parent
# The pipeline's archive: its metadata names the version the server reports, which for a quantized
# variant is the export's plus "-int8", so rules made from the export's metadata would match nothing.
SERVED_META = REPO / "model_store" / "fashion_mnist.mar"
DEFAULT_OUT = REPO / "monitoring" / "prometheus" / "rules.yml"
MODEL = ("ModelName", "ModelVersion")
BY_MODEL = "ModelName, ModelVersion"
# A live bin with no traffic has share 0 and ln(0) = -inf; PSI implementations floor shares at a
# small epsilon instead. 1e-4 adds at most ~0.001 per empty bin that the reference also leaves empty.
EPSILON = 1e-4
GKE_JOB = "fashion-mnist"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d))+$")


class RulesError(ValueError):
    """The metadata or the options cannot make rules; the message says what to do."""


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds; docs/monitoring.md ("Thresholds") says where each number comes from."""

    # PSI > 0.25 is the usual "significant shift" line. With 10 equally full reference bins,
    # sampling noise alone gives PSI ~ chi2(9)/n: at the minimum of 200 requests its 99.9th
    # percentile is 0.14, so clean traffic stays below 0.25.
    psi: float = 0.25
    # Total variation distance between the live class mix and the training prior. Noise at 200
    # requests and 10 balanced classes: ~0.1 on average, 0.2 rarely; 0.3 means about a third of
    # the answers moved to other classes.
    class_mix: float = 0.3
    # The low-confidence share may grow to this many times the held-out reference (and at least
    # `low_confidence_margin` above it) before the alert fires.
    low_confidence_factor: float = 3.0
    low_confidence_margin: float = 0.1
    # Top-1 confidence below this edge counts as low confidence (an edge of CONFIDENCE_EDGES).
    low_confidence_below: float = 0.6
    # Shares need enough requests in the window to mean anything (see `psi`).
    min_requests: int = 200
    error_ratio_5xx: float = 0.01
    error_ratio_4xx: float = 0.25
    # The default histogram buckets top out at 10 ms, so the p99 threshold must stay below 10.
    handler_p99_ms: float = 8.0


@dataclass(frozen=True)
class Windows:
    """Durations (Prometheus syntax); short ones let the end-to-end test see alerts in seconds."""

    drift: str = "15m"  # window the live distributions are measured over
    rate: str = "5m"  # window of request rates, error ratios and latency
    hold: str = "10m"  # how long a condition must hold before its alert fires (`for`)
    target_down: str = "1m"
    # A worker start counts as a restart only when the model has been reporting this long, so
    # the workers starting with the server (several, a few seconds apart) do not page anyone.
    grace: str = "20m"
    interval: str = "30s"  # rule evaluation interval


def _duration(text: str, option: str) -> str:
    if not DURATION.match(text):
        raise RulesError(f"{option} {text!r} is not a Prometheus duration such as 30s, 5m or 1h")
    return text


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def reference(meta: dict[str, Any]) -> dict[str, Any]:
    """The reference histograms and class prior from model_meta.json, as shares."""
    stats = meta.get("reference_stats") or {}
    hists, class_counts = stats.get("histograms"), stats.get("class_counts")
    missing = [name for name in (*FEATURES, "confidence") if name not in (hists or {})]
    if missing or not class_counts:
        raise RulesError(
            f"model_meta.json has no reference histograms for {missing or ['class_counts']}; re-export the "
            "model with `python -m training.export` (it records them) and generate the rules again"
        )
    classes = meta["classes"]
    if len(class_counts) != len(classes):
        raise RulesError(f"reference class_counts has {len(class_counts)} entries for {len(classes)} classes")

    def shares(counts: Sequence[int]) -> list[float]:
        total = sum(counts)
        if total <= 0:
            raise RulesError(
                "a reference histogram is empty; re-export the model with `python -m training.export`"
            )
        return [c / total for c in counts]

    return {
        "features": {name: shares(hists[name]["counts"]) for name in FEATURES},
        "confidence_edges": hists["confidence"]["edges"],
        "confidence": shares(hists["confidence"]["counts"]),
        "classes": dict(zip(classes, shares(class_counts), strict=True)),
    }


def build_rules(meta: dict[str, Any], windows: Windows, limits: Thresholds, job: str) -> dict[str, Any]:
    """The rules file as a dict: reference constants, model and system recording rules, alerts."""
    ref = reference(meta)
    model_labels = {"ModelName": meta["name"], "ModelVersion": str(meta["version"])}
    w, r = windows.drift, windows.rate

    constants: list[dict[str, Any]] = []
    for feature, feature_shares in ref["features"].items():
        for b, share in enumerate(feature_shares):
            constants.append(
                {
                    "record": "fashion:input_reference_share",
                    "expr": f"vector({_fmt(max(share, EPSILON))})",
                    "labels": {**model_labels, "feature": feature, "bin": str(b)},
                }
            )
    for name, share in ref["classes"].items():
        constants.append(
            {
                "record": "fashion:class_reference_share",
                "expr": f"vector({_fmt(share)})",
                "labels": {**model_labels, "class": name},
            }
        )
    edges = ref["confidence_edges"]
    low_bins = [str(b) for b in range(len(edges) - 1) if edges[b + 1] <= limits.low_confidence_below + 1e-9]
    if not low_bins:
        raise RulesError(f"no confidence bin lies below {limits.low_confidence_below}; bins are {edges}")
    ref_low = sum(ref["confidence"][int(b)] for b in low_bins)
    constants.append(
        {
            "record": "fashion:low_confidence_reference_share",
            "expr": f"vector({_fmt(ref_low)})",
            "labels": model_labels,
        }
    )

    live_share = "fashion:input_bin_share:window"
    on_bin = "on(ModelName, ModelVersion, feature, bin)"
    model = [
        {"record": "fashion:requests:window", "expr": f"sum by ({BY_MODEL}) (increase({PREDICTIONS}[{w}]))"},
        {
            "record": live_share,
            "expr": (
                f"sum by ({BY_MODEL}, feature, bin) (increase({INPUT}[{w}]))\n"
                f"  / ignoring(bin) group_left\n"
                f"sum by ({BY_MODEL}, feature) (increase({INPUT}[{w}]))"
            ),
        },
        {
            # Population stability index per feature: sum over bins of (live - ref) * ln(live / ref).
            "record": "fashion:input_psi:window",
            "expr": (
                f"sum by ({BY_MODEL}, feature) (\n"
                f"  (clamp_min({live_share}, {EPSILON}) - {on_bin} fashion:input_reference_share)\n"
                f"  * {on_bin}\n"
                f"  ln(clamp_min({live_share}, {EPSILON}) / {on_bin} fashion:input_reference_share)\n"
                f")"
            ),
        },
        {
            "record": "fashion:class_share:window",
            "expr": (
                f"sum by ({BY_MODEL}, class) (increase({PREDICTIONS}[{w}]))\n"
                f"  / ignoring(class) group_left\n"
                f"sum by ({BY_MODEL}) (increase({PREDICTIONS}[{w}]))"
            ),
        },
        {
            # Total variation distance: the share of answers that would have to change class to
            # give the training mix back.
            "record": "fashion:class_mix_distance:window",
            "expr": (
                f"0.5 * sum by ({BY_MODEL}) (abs(\n"
                f"  fashion:class_share:window\n"
                f"    - on(ModelName, ModelVersion, class) fashion:class_reference_share\n"
                f"))"
            ),
        },
        {
            "record": "fashion:low_confidence_share:window",
            "expr": (
                f'sum by ({BY_MODEL}) (increase({CONFIDENCE}{{bin=~"{"|".join(low_bins)}"}}[{w}]))\n'
                f"  / sum by ({BY_MODEL}) (increase({CONFIDENCE}[{w}]))"
            ),
        },
    ]

    total = (
        f"sum(rate(Requests2XX[{r}])) + sum(rate(Requests4XX[{r}]))"
        f" + (sum(rate(Requests5XX[{r}])) or vector(0))"
    )
    system = [
        {
            "record": "fashion:request_rate:rate",
            "expr": f"sum by (model_name) (rate(ts_inference_requests_total[{r}]))",
        },
        {
            "record": "fashion:error_ratio:rate",
            "expr": f"(sum(rate(Requests4XX[{r}])) or vector(0)) / ({total})",
            "labels": {"code_class": "4xx"},
        },
        {
            "record": "fashion:error_ratio:rate",
            "expr": f"(sum(rate(Requests5XX[{r}])) or vector(0)) / ({total})",
            "labels": {"code_class": "5xx"},
        },
        {
            "record": "fashion:handler_latency_p99_ms:rate",
            "expr": f"histogram_quantile(0.99, sum by (ModelName, le) (rate(HandlerTime_bucket[{r}])))",
        },
        {
            "record": "fashion:worker_restarts:increase",
            "expr": (
                f"sum by ({BY_MODEL}, Hostname) (increase({WORKER_STARTS}[{r}]))\n"
                f"  and on({BY_MODEL}, Hostname) ({WORKER_STARTS} offset {windows.grace})"
            ),
        },
    ]

    enough = f"and on({BY_MODEL}) fashion:requests:window >= {limits.min_requests}"
    low_limit = max(ref_low * limits.low_confidence_factor, ref_low + limits.low_confidence_margin)
    alerts = [
        _alert(
            "InputDrift",
            f"fashion:input_psi:window > {_fmt(limits.psi)}\n  {enough}",
            windows.hold,
            "warning",
            "Inputs of {{ $labels.ModelName }} {{ $labels.ModelVersion }} no longer look like the training "
            'data: PSI of {{ $labels.feature }} is {{ $value | printf "%.2f" }}',
            "Look at recent inputs in the prediction log (predictions.log / Cloud Logging) and at the "
            "dashboard's input panels: a new client, camera, background or preprocessing upstream? "
            "If the new inputs are legitimate, collect and label them and retrain.",
        ),
        _alert(
            "PredictionMixShift",
            f"fashion:class_mix_distance:window > {_fmt(limits.class_mix)}\n  {enough}",
            windows.hold,
            "warning",
            "The class mix of {{ $labels.ModelName }} {{ $labels.ModelVersion }} is "
            '{{ $value | printf "%.2f" }} (total variation) away from the training prior',
            "Compare the class-mix panel with the InputDrift panels: a real change in what users send, "
            "or a drifted input that the model maps to one class. Check a sample of predictions by hand.",
        ),
        _alert(
            "LowConfidence",
            f"fashion:low_confidence_share:window > {_fmt(low_limit)}\n  {enough}",
            windows.hold,
            "warning",
            "{{ $value | humanizePercentage }} of answers of {{ $labels.ModelName }} have top-1 confidence "
            f"below {limits.low_confidence_below} (held-out reference {ref_low:.1%})",
            "The model is unsure about many inputs: check InputDrift and the prediction log for what "
            "changed; low-confidence answers are candidates for labelling.",
        ),
        _alert(
            "HighErrorRatio",
            f'fashion:error_ratio:rate{{code_class="5xx"}} > {_fmt(limits.error_ratio_5xx)}\n'
            f'  or fashion:error_ratio:rate{{code_class="4xx"}} > {_fmt(limits.error_ratio_4xx)}',
            windows.hold,
            "critical",
            "{{ $value | humanizePercentage }} of responses are {{ $labels.code_class }}",
            "5xx: read the server log (ts.log / container stdout) for worker errors and timeouts. "
            "4xx: the rejected-inputs panel names the error code; a client is sending bad requests.",
        ),
        _alert(
            "HighLatency",
            f"fashion:handler_latency_p99_ms:rate > {_fmt(limits.handler_p99_ms)}",
            windows.hold,
            "warning",
            'p99 handler time per batch of {{ $labels.ModelName }} is {{ $value | printf "%.1f" }} ms',
            "Check CPU saturation and queue time on the dashboard; scale out (HPA / more workers) or "
            "reduce the batch size. docs/serving.md has the measured capacity.",
        ),
        _alert(
            "WorkerRestarts",
            "fashion:worker_restarts:increase > 0",
            "0s",
            "warning",
            "A worker of {{ $labels.ModelName }} on {{ $labels.Hostname }} started again while serving",
            "Read the server log around the restart: a crash (OOM kill, segfault) or a response timeout "
            "makes TorchServe restart the worker. Repeated restarts mean lost requests.",
        ),
        _alert(
            "TargetDown",
            f'up{{job="{job}"}} == 0',
            windows.target_down,
            "critical",
            "Prometheus cannot scrape {{ $labels.instance }}",
            "The server (or pod) is down or its metrics port is unreachable: check the process / "
            "`kubectl get pods`, then the server log.",
        ),
    ]
    # One group: Prometheus evaluates a group's rules in order, so every alert sees the recording
    # rules of the same evaluation, and those see the reference constants.
    return {
        "groups": [
            {
                "name": "fashion-mnist",
                "interval": windows.interval,
                "rules": constants + model + system + alerts,
            }
        ]
    }


def _alert(name: str, expr: str, hold: str, severity: str, summary: str, runbook: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": hold,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "runbook": runbook},
    }


class _Literal(str):
    """A multi-line PromQL expression, written as a YAML block so the file stays readable."""


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


def to_yaml(rules: dict[str, Any]) -> str:
    dumper = type("RulesDumper", (yaml.SafeDumper,), {})
    dumper.add_representer(_Literal, _literal)

    def literal_exprs(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (_Literal(v) if k == "expr" and "\n" in v else literal_exprs(v)) for k, v in node.items()
            }
        if isinstance(node, list):
            return [literal_exprs(v) for v in node]
        return node

    return yaml.dump(literal_exprs(rules), Dumper=dumper, sort_keys=False, width=120)


def gmp_rules(rules: dict[str, Any]) -> dict[str, Any]:
    """The same groups as a Google Managed Prometheus `Rules` resource (namespace-scoped)."""
    return {
        "apiVersion": "monitoring.googleapis.com/v1",
        "kind": "Rules",
        "metadata": {"name": "fashion-mnist", "labels": {"app.kubernetes.io/name": "fashion-mnist"}},
        "spec": rules,
    }


def load_meta(path: Path) -> dict[str, Any]:
    """A model_meta.json, or the one inside a .mar: the metadata of the model the server serves.

    Raises FileNotFoundError, json.JSONDecodeError, or RulesError for a file that is no archive.
    """
    if path.suffix != ".mar":
        return json.loads(path.read_text(encoding="utf-8"))
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("model_meta.json"))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RulesError(
            f"{path} is not a model archive with a model_meta.json ({exc}); build it with "
            "`python -m archive.build`"
        ) from None


def write(
    meta_file: Path, out: Path, windows: Windows, limits: Thresholds, job: str, gke: Path | None
) -> None:
    """Write the rules for `job`'s targets to `out`, and to `gke` as a GMP Rules resource."""
    try:
        meta = load_meta(meta_file)
    except FileNotFoundError:
        raise RulesError(
            f"{meta_file} not found; build the archive with `python -m archive.build` (or pass --meta "
            "the served model's model_meta.json)"
        ) from None
    # The header names only the model version (derived from its weights), not when or from which
    # commit it was exported: retraining the same model rewrites byte-identical rules, so running the
    # main job again leaves the committed files unchanged, and a real change shows as a real diff.
    header = (
        f"# GENERATED by `python -m monitoring.rules` from {meta_file.name} of model {meta['name']} "
        f"{meta['version']}.\n"
        "# Do not edit; regenerate after every archive build: the reference shares below are that model's.\n"
    )
    outputs = [(out, build_rules(meta, windows, limits, job))]
    if gke is not None:
        # PodMonitoring names the scrape job on GKE (deploy/overlays/gke/podmonitoring.yaml).
        outputs.append((gke, gmp_rules(build_rules(meta, windows, limits, GKE_JOB))))
    for path, content in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + to_yaml(content), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--meta", type=Path, default=SERVED_META, help="the served .mar, or a model_meta.json of that model"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gke", type=Path, help="also write the rules as a GMP Rules resource here")
    parser.add_argument("--job", default="torchserve", help="scrape job name of the TorchServe targets")
    defaults = Windows()
    for name in ("drift", "rate", "hold", "target_down", "grace", "interval"):
        flag = "--window" if name == "drift" else "--for" if name == "hold" else f"--{name.replace('_', '-')}"
        parser.add_argument(
            flag, dest=name, default=getattr(defaults, name), help=f"default {getattr(defaults, name)}"
        )
    parser.add_argument("--min-requests", type=int, default=Thresholds.min_requests)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        windows = Windows(
            **{name: _duration(getattr(args, name), name) for name in Windows.__dataclass_fields__}
        )
        if args.min_requests < 1:
            raise RulesError("--min-requests must be at least 1")
        write(args.meta, args.out, windows, Thresholds(min_requests=args.min_requests), args.job, args.gke)
    except (RulesError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + (f" and {args.gke}" if args.gke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
