"""The CI soak: `python -m scripts.soak` for 30 seconds at 80% of measured capacity, on the real server.

    python -m pytest tests/test_soak.py -q        # about a minute: start, 5 s capacity, warm-up, 30 s soak

The full 5-minute soak is `python -m scripts.soak` (docs/reliability.md). This runs the same command,
on an archive of a random-weights export with random-noise PNGs (neither changes errors or memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving import REPO
from tests.reliability import random_archive

# RSS may grow this much from the start of the soak (after the warm-up) to its end.
MAX_RSS_GROWTH_PCT = 10.0


@pytest.mark.serving
@pytest.mark.slow
@pytest.mark.solo  # asserts the achieved rate and flat memory: other tests' load would move both
def test_thirty_second_soak_has_no_errors_and_flat_memory(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    archive = random_archive(tmp_path_factory)
    report, figure = tmp_path / "soak.json", tmp_path / "rss.png"
    argv = [
        "--minutes", "0.5", "--capacity-seconds", "5", "--max-warmup-seconds", "90", "--synthetic-images",
        "--model-store", str(archive.store), "--state-dir", str(tmp_path / "state"),
        "--report", str(report), "--figure", str(figure), "--no-doc",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "scripts.soak", *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert report.is_file(), done.stderr
    result = json.loads(report.read_text())

    assert (result["errors"], result["statuses"]) == (0, {"200": result["requests"]})
    assert result["warmup_errors"] == 0
    assert result["warmup_settled"], "memory was still changing after 90 s of load"
    assert result["achieved_rps"] > 0.9 * result["target_rps"], "the soak did not hold its load"
    assert not result["workers_replaced"]
    growth = {"jvm": result["jvm"]["growth_pct"]} | {
        f"worker {pid}": worker["growth_pct"] for pid, worker in result["workers"].items()
    }
    assert len(growth) >= 2 and all(pct < MAX_RSS_GROWTH_PCT for pct in growth.values()), growth
    assert done.returncode == 0 and figure.stat().st_size > 0, done.stderr
