"""`clgrid bench --quick`: the platform benchmark runs end to end and prints every ratio (no timing checks)."""

import json
from pathlib import Path

import pytest

from conftest import run_clgrid

pytestmark = pytest.mark.slow


def test_quick_benchmark_prints_every_ratio(tmp_path: Path) -> None:
    proc = run_clgrid("bench", "--quick", "--out", str(tmp_path / "results.json"), cwd=tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for prefix in ("machine:", "trainer overhead naive:", "trainer overhead replay:", "trainer overhead ewc:",
                   "sweep efficiency:", "evaluation share:", "instrumentation cost:", "scaling with experiences:",
                   "scaling with memory size:"):
        assert any(line.startswith(prefix) for line in lines), f"no line starting with {prefix!r}:\n{proc.stdout}"
    # the hand-written loops do the trainer's work: same data order, random draws and accuracy matrix
    assert sum("same accuracy matrix: yes" in line for line in lines) == 3, proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"trainer", "sweep", "scaling"} <= results.keys()
    assert results["sweep"]["trials"] == 2


def test_quick_scale_benchmark_prints_every_figure_with_its_target(tmp_path: Path) -> None:
    proc = run_clgrid("bench", "--scale", "--quick", "--out", str(tmp_path / "scale.json"), cwd=tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("scale:")]
    assert len(lines) == 4, proc.stdout  # two sweep sizes, the driver's memory, the report
    assert all("target" in line and line.rstrip(")").endswith(("met", "missed")) for line in lines), lines
    results = json.loads((tmp_path / "scale.json").read_text())
    assert [s["trials"] for s in results["sweeps"]] == [8, 16]
    assert all(s["train_seconds"] > 0 and s["driver_peak_rss_mb"] > 0 for s in results["sweeps"])
    assert results["report"]["runs"] == 16 and results["report"]["seconds"] > 0
