"""The container load benchmark (`python -m scripts.bench_container_load`): its choice of CPU limit
and HPA target, its refusals, one real point against the serving image, and deploy/ against the
figures docs/deploy.md records.

    python -m pytest tests/test_container_load.py                 # -m "not container": no Docker
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.bench_container_load import main
from serving import container_load as cl
from serving.docblock import markers
from serving.wrk import WrkResult
from tests.containers import build_image
from tests.reliability import random_archive

RUNTIME_IMAGE = "fashion-mnist-serve:test-runtime"
# The table row of 1 CPU, 2 clients: req/s, p50, p99, errors, CPU use, throttled periods.
ROW = r"^\| 1 \| 2 \| ([\d,]+) \| ([\d.]+) ms \| ([\d.]+) ms \| (\d+ / \d+) \| (\d+)% \| (\d+)% \|$"
DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def point(clients: int, rps: float, p99: float, cpu: float) -> cl.Point:
    load = WrkResult(clients, 5.0, int(rps * 5), rps, p99 / 2, p99 / 2, p99 / 2, p99)
    return cl.Point(load, cpu, 0.0)


def outcome(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as done:  # argparse's usage errors
        code = int(done.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_choice_takes_most_capacity_per_cpu_and_scales_out_below_it() -> None:
    one = cl.LimitRun(1.0, [point(1, 100, 4, 0.2), point(4, 400, 8, 0.6), point(16, 500, 30, 0.95)])
    two = cl.LimitRun(2.0, [point(1, 100, 4, 0.1), point(4, 420, 7, 0.3), point(16, 600, 12, 0.5)])
    results = cl.Results("image", 5, 2, "machine", "1Gi", [one, two])
    advice = cl.recommend(results)
    assert advice is not None
    # 1 CPU holds 400 req/s under 10 ms, 2 CPUs 420: per CPU, one wins. 80 % of 400 = 320 req/s
    # lies between 100 req/s at 20 % and 400 req/s at 60 %: 20 + 40 * 220 / 300 = 49.3 %.
    assert (advice.quantity, advice.target_rps, advice.utilization) == ("1", 320, 49)


def test_no_choice_when_no_point_meets_the_latency_bound() -> None:
    run = cl.LimitRun(1.0, [point(1, 100, 12, 0.3), point(4, 300, 25, 0.9)])
    assert cl.recommend(cl.Results("image", 5, 2, "machine", "1Gi", [run])) is None


@pytest.mark.parametrize(("cpus", "quantity"), [(1.0, "1"), (2.0, "2"), (1.5, "1500m"), (0.25, "250m")])
def test_cpu_quantities_are_written_as_kubernetes_does(cpus: float, quantity: str) -> None:
    assert cl.cpu_quantity(cpus) == quantity


def test_deploy_has_what_the_measurement_chose() -> None:
    chosen = cl.recorded(DOC.read_text(encoding="utf-8"))
    assert chosen is not None, f"{DOC}'s bench_container_load block records no choice for deploy/"
    cpu, utilization = chosen
    assert cl.deployed() == (cpu, cpu, utilization), (
        "deploy/base/deployment.yaml (torchserve cpu request, limit) and hpa.yaml (averageUtilization "
        f"of the torchserve container) must say what docs/deploy.md measured: {cpu}, {cpu}, {utilization}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpus", "0"], "every --cpus must be > 0"),
        (["--cpus", "1", "4096"], "at most this machine's"),
        (["--clients", "0", "4"], "every --clients must be >= 1"),
        (["--seconds", "0"], "--seconds, --warmup and --p99-ms must be > 0"),
        (["--p99-ms", "-1"], "--seconds, --warmup and --p99-ms must be > 0"),
        (["--cpus", "one"], "invalid float value"),
        (["--model-store", "/nonexistent-store"], "has no fashion_mnist.mar: build one with"),
    ],
)
def test_bad_arguments_exit_2_naming_the_fix(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = outcome([*args, "--no-doc"], capsys)
    assert code == 2, text
    assert message in text


@pytest.mark.container
def test_a_missing_image_exits_2_naming_the_build(capsys: pytest.CaptureFixture[str]) -> None:
    code, text = outcome(["--image", "fashion-mnist-serve:no-such-tag", "--no-doc"], capsys)
    assert code == 2, text
    assert "build it with scripts/build_image.sh" in text


@pytest.mark.container
def test_one_point_writes_a_well_formed_block(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    real_data_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = build_image(RUNTIME_IMAGE, target="runtime")
    store = random_archive(tmp_path_factory).store
    begin, end = markers("bench_container_load")
    doc, figure = tmp_path / "deploy.md", tmp_path / "figures" / "load.png"
    doc.write_text(f"# Deploy\n\n{begin}\nold figures\n{end}\n\nafter\n", encoding="utf-8")
    args = ["--image", image, "--model-store", str(store), "--data", str(real_data_root), "--cpus", "1"]
    args += ["--clients", "2", "--seconds", "1", "--warmup", "1", "--doc", str(doc), "--figure", str(figure)]
    code, text = outcome(args, capsys)
    assert code == 0, text
    written = doc.read_text(encoding="utf-8")
    block = written.split(begin)[1].split(end)[0]
    assert "old figures" not in written and written.endswith(f"{end}\n\nafter\n")
    assert "scripts.bench_container_load " + " ".join(args) in block
    assert "load average at start" in block and "at the end" in block
    row = re.search(ROW, block, re.M)
    assert row is not None, block
    rps, p50, p99, errors, cpu, throttled = row.groups()
    assert float(rps.replace(",", "")) > 0 and float(p50) <= float(p99), row.group(0)
    # The cgroup's CPU time, as a share of the 1-CPU quota: the kernel caps it near 100 %.
    assert 0 < int(cpu) <= 110 and 0 <= int(throttled) <= 100, row.group(0)
    assert "Capacity at p99 <= 10 ms" in block
    assert ("Chosen for deploy/" in block) == (float(p99) <= 10 and errors == "0 / 0"), block
    assert "](figures/load.png)" in block
    assert figure.read_bytes().startswith(b"\x89PNG")
