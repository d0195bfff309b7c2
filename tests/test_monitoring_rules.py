"""The generated Prometheus rules, checked by Prometheus' own tools.

`promtool check rules` parses them; `promtool test rules` replays synthetic series through them and
checks that each alert fires on the series that should fire it and stays silent otherwise. The
expected PSI and class-mix values are computed here with the textbook formulas, independently of
the PromQL. Also `amtool check-config` on the committed Alertmanager config.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring import rules
from training.data import CLASSES

REPO = Path(__file__).resolve().parent.parent
LABELS = 'ModelName="fashion_mnist",ModelVersion="1.0",Level="Model",Hostname="pod-a"'
MODEL = {"ModelName": "fashion_mnist", "ModelVersion": "1.0"}
BINS = 10
# Held-out confidence: 10% below 0.6 (bins 0 and 1 of CONFIDENCE_EDGES), so LowConfidence's limit
# is max(3 x 10%, 10% + 10%) = 30%.
CONFIDENCE_COUNTS = [5, 5, 10, 10, 20, 20, 20, 10]
WINDOWS = rules.Windows(drift="5m", rate="1m", hold="2m", target_down="1m", grace="10m", interval="1m")


def meta() -> dict[str, Any]:
    """A model whose training reference is uniform over 10 bins per feature and over the classes."""
    from handler.monitor import CONFIDENCE_EDGES

    flat = {"edges": [i / BINS for i in range(BINS + 1)], "counts": [100] * BINS}
    return {
        "name": "fashion_mnist",
        "version": "1.0",
        "classes": CLASSES,
        "reference_stats": {
            "histograms": {
                "brightness": flat,
                "contrast": flat,
                "white_share": flat,
                "confidence": {"edges": list(CONFIDENCE_EDGES), "counts": CONFIDENCE_COUNTS},
            },
            "class_counts": [600] * len(CLASSES),
        },
    }


def psi(live: list[float], ref: list[float]) -> float:
    live = [max(x, rules.EPSILON) for x in live]
    return sum((a - e) * math.log(a / e) for a, e in zip(live, ref, strict=True))


def traffic(
    per_minute: int = 100, brightness: list[int] | None = None, classes: list[int] | None = None, low: int = 5
) -> list[dict[str, str]]:
    """Counter series for 30 minutes of steady traffic: `per_minute` answers, spread as given."""
    uniform = [per_minute // BINS] * BINS
    series = []
    for feature in ("brightness", "contrast", "white_share"):
        counts = brightness if (feature == "brightness" and brightness) else uniform
        for b, n in enumerate(counts):
            series.append(
                {
                    "series": f'fashion_input_bin{{{LABELS},feature="{feature}",bin="{b}"}}',
                    "values": f"0+{n}x30",
                }
            )
    for name, n in zip(CLASSES, classes or [per_minute // len(CLASSES)] * len(CLASSES), strict=True):
        series.append({"series": f'fashion_predictions{{{LABELS},class="{name}"}}', "values": f"0+{n}x30"})
    rest = [(per_minute - 2 * low) // 6] * 6
    for b, n in enumerate([low, low, *rest]):
        series.append({"series": f'fashion_confidence_bin{{{LABELS},bin="{b}"}}', "values": f"0+{n}x30"})
    return series


def http(ok: int, client_errors: int = 0, server_errors: int | None = None) -> list[dict[str, str]]:
    out = [
        {"series": 'Requests2XX{Level="Host",Hostname="pod-a"}', "values": f"0+{ok}x30"},
        {"series": 'Requests4XX{Level="Host",Hostname="pod-a"}', "values": f"0+{client_errors}x30"},
    ]
    if server_errors is not None:  # TorchServe creates the 5XX series only at the first 5xx
        out.append(
            {"series": 'Requests5XX{Level="Host",Hostname="pod-a"}', "values": f"0+{server_errors}x30"}
        )
    return out


def latency(le_counts: dict[str, int]) -> list[dict[str, str]]:
    labels = 'ModelName="fashion_mnist",Level="Model"'
    return [
        {"series": f'HandlerTime_bucket{{{labels},le="{le}"}}', "values": f"0+{n}x30"}
        for le, n in le_counts.items()
    ]


def case(series: list[dict[str, str]], alert: str, at: str, fired: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": fired}],
    }


def summary(alert: str, **fields: str) -> dict[str, str]:
    """The annotations an alert renders, from the generated rule's templates."""
    rule = next(r for r in generated()["groups"][0]["rules"] if r.get("alert") == alert)
    rendered = {}
    for key, text in rule["annotations"].items():
        for name, value in fields.items():
            text = text.replace("{{ " + name + " }}", value)
        rendered[key] = text
    return rendered


def generated() -> dict[str, Any]:
    return rules.build_rules(meta(), WINDOWS, rules.Thresholds(), job="torchserve")


def alert(name: str, severity: str, labels: dict[str, str], **fields: str) -> dict[str, Any]:
    fields = {"$labels.ModelName": "fashion_mnist", "$labels.ModelVersion": "1.0", **fields}
    return {"exp_labels": {**labels, "severity": severity}, "exp_annotations": summary(name, **fields)}


def promtool_cases() -> list[dict[str, Any]]:
    drifted = [0] * (BINS - 1) + [100]  # every image in the brightest bin
    drift_psi = psi([n / 100 for n in drifted], [0.1] * BINS)
    skewed = [91] + [1] * 9  # nine in ten answers are T-shirts
    tvd = 0.5 * sum(abs(n / 100 - 0.1) for n in skewed)
    return [
        case(traffic(), "InputDrift", "20m", []),
        case(
            traffic(brightness=drifted),
            "InputDrift",
            "20m",
            [
                alert(
                    "InputDrift",
                    "warning",
                    {**MODEL, "feature": "brightness"},
                    **{"$labels.feature": "brightness", '$value | printf "%.2f"': f"{drift_psi:.2f}"},
                )
            ],
        ),  # fmt: skip
        # The same shift in a trickle of traffic (20 a minute, 100 per window) is not evidence yet.
        case(traffic(per_minute=20, brightness=[0] * 9 + [20]), "InputDrift", "20m", []),
        case(traffic(), "PredictionMixShift", "20m", []),
        case(
            traffic(classes=skewed),
            "PredictionMixShift",
            "20m",
            [alert("PredictionMixShift", "warning", MODEL, **{'$value | printf "%.2f"': f"{tvd:.2f}"})],
        ),
        case(traffic(low=5), "LowConfidence", "20m", []),
        case(
            traffic(low=47),
            "LowConfidence",
            "20m",
            [alert("LowConfidence", "warning", MODEL, **{"$value | humanizePercentage": "94%"})],
        ),
        case(http(ok=95, client_errors=5), "HighErrorRatio", "20m", []),
        case(
            http(ok=90, server_errors=10),
            "HighErrorRatio",
            "20m",
            [
                alert(
                    "HighErrorRatio",
                    "critical",
                    {"code_class": "5xx"},
                    **{"$value | humanizePercentage": "10%", "$labels.code_class": "5xx"},
                )
            ],
        ),  # fmt: skip
        case(
            http(ok=60, client_errors=40),
            "HighErrorRatio",
            "20m",
            [
                alert(
                    "HighErrorRatio",
                    "critical",
                    {"code_class": "4xx"},
                    **{"$value | humanizePercentage": "40%", "$labels.code_class": "4xx"},
                )
            ],
        ),  # fmt: skip
        case(latency({"1.0": 100, "10.0": 100, "+Inf": 100}), "HighLatency", "20m", []),
        case(
            latency({"2.5": 0, "10.0": 100, "+Inf": 100}),
            "HighLatency",
            "20m",
            [
                alert(
                    "HighLatency",
                    "warning",
                    {"ModelName": "fashion_mnist"},
                    **{'$value | printf "%.1f"': "9.9"},
                )
            ],
        ),
        # Two workers starting a few seconds apart with the server: not a restart.
        case(
            [{"series": f"fashion_worker_starts{{{LABELS}}}", "values": "1 2x30"}], "WorkerRestarts", "1m", []
        ),
        case(
            [{"series": f"fashion_worker_starts{{{LABELS}}}", "values": "1x20 2x10"}],
            "WorkerRestarts",
            "21m",
            [
                alert(
                    "WorkerRestarts",
                    "warning",
                    {**MODEL, "Hostname": "pod-a"},
                    **{"$labels.Hostname": "pod-a"},
                )
            ],
        ),
        case(
            [{"series": 'up{job="torchserve",instance="pod-a:8082"}', "values": "1x30"}],
            "TargetDown",
            "20m",
            [],
        ),
        case(
            [{"series": 'up{job="torchserve",instance="pod-a:8082"}', "values": "1x5 0x20"}],
            "TargetDown",
            "10m",
            [
                alert(
                    "TargetDown",
                    "critical",
                    {"job": "torchserve", "instance": "pod-a:8082"},
                    **{"$labels.instance": "pod-a:8082"},
                )
            ],
        ),  # fmt: skip
    ]


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `scripts/setup.sh --dev` (Debian package prometheus)")
    return binary


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = [r["alert"] for r in generated()["groups"][0]["rules"] if "alert" in r]
    assert alerts == [
        "InputDrift", "PredictionMixShift", "LowConfidence", "HighErrorRatio", "HighLatency",
        "WorkerRestarts", "TargetDown",
    ]  # fmt: skip
    for name in alerts:
        results = [
            t["alert_rule_test"][0] for t in promtool_cases() if t["alert_rule_test"][0]["alertname"] == name
        ]
        assert any(r["exp_alerts"] for r in results), f"no case fires {name}"
        assert any(not r["exp_alerts"] for r in results), f"no case keeps {name} silent"
        assert all("runbook" in r["annotations"] for r in generated()["groups"][0]["rules"] if "alert" in r)


def test_promtool_unit_tests_fire_and_stay_silent(tmp_path: Path, promtool: str) -> None:
    (tmp_path / "meta.json").write_text(json.dumps(meta()))
    windows = [f"--{k.replace('_', '-')}={v}" for k, v in vars(WINDOWS).items() if k not in ("drift", "hold")]
    code = rules.main(
        ["--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "rules.yml"),
         f"--window={WINDOWS.drift}", f"--for={WINDOWS.hold}", *windows]
    )  # fmt: skip
    assert code == 0
    assert yaml.safe_load((tmp_path / "rules.yml").read_text()) == generated()
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": promtool_cases()})
    )
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_rules_parse_and_gke_carries_the_same_groups(tmp_path: Path, promtool: str) -> None:
    local = yaml.safe_load((REPO / "monitoring" / "prometheus" / "rules.yml").read_text())
    gke = yaml.safe_load((REPO / "deploy" / "overlays" / "gke" / "rules.yaml").read_text())
    (tmp_path / "gke.yml").write_text(yaml.safe_dump(gke["spec"]))
    for path in (REPO / "monitoring" / "prometheus" / "rules.yml", tmp_path / "gke.yml"):
        check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    # Only the scrape job differs: PodMonitoring names it on GKE.
    as_gke = yaml.safe_dump(local).replace('job="torchserve"', f'job="{rules.GKE_JOB}"')
    assert as_gke == yaml.safe_dump(gke["spec"])


def test_alertmanager_config_is_valid() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail(
            "amtool is not installed: run `scripts/setup.sh --dev` (Debian package prometheus-alertmanager)"
        )
    config = REPO / "monitoring" / "alertmanager" / "alertmanager.yml"
    check = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reference_stats": {}}, "python -m training.export"),
        ({"reference_stats": {"histograms": meta()["reference_stats"]["histograms"], "class_counts": [1, 2]}},
         "class_counts"),
    ],
)  # fmt: skip
def test_rules_cli_names_the_fix_for_bad_metadata(
    tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, message: str
) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({**meta(), **change}))
    assert rules.main(["--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "r.yml")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.yml").exists()


def test_rules_cli_refuses_a_bad_window(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "meta.json").write_text(json.dumps(meta()))
    assert rules.main(["--meta", str(tmp_path / "meta.json"), "--window", "15 minutes"]) == 2
    assert "Prometheus duration" in capsys.readouterr().err


def test_rules_from_an_archive_select_the_version_it_serves(tmp_path: Path) -> None:
    """An int8 archive serves as the export's version plus "-int8": rules made from the export's
    metadata would select series no server reports."""
    mar = tmp_path / "fashion_mnist.mar"
    with zipfile.ZipFile(mar, "w") as archive:
        archive.writestr("model_meta.json", json.dumps({**meta(), "version": "1.0-int8"}))
    assert rules.main(["--meta", str(mar), "--out", str(tmp_path / "r.yml")]) == 0
    text = (tmp_path / "r.yml").read_text()
    assert "ModelVersion: 1.0-int8" in text and "ModelVersion: '1.0'" not in text


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda mar: mar.write_text("not a zip"), "is not a model archive"),
        (lambda mar: zipfile.ZipFile(mar, "w").close(), "is not a model archive"),
        (lambda mar: None, "python -m archive.build"),
    ],
    ids=["not-a-zip", "no-metadata", "missing"],
)
def test_rules_cli_names_the_fix_for_a_bad_archive(
    tmp_path: Path, capsys: pytest.CaptureFixture, write, message: str
) -> None:
    write(tmp_path / "fashion_mnist.mar")
    assert rules.main(["--meta", str(tmp_path / "fashion_mnist.mar"), "--out", str(tmp_path / "r.yml")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.yml").exists()
