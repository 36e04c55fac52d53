"""bench.py end to end at a toy resolution: every figure it promises is printed, positive and finite.
(The figures themselves are measured at the defaults and reported in docs/performance.md, not asserted.)"""

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def test_allocated_peak_growth_counts_what_is_held_at_once_not_what_was_allocated():
    import torch

    import bench

    def step():
        first = torch.ones(2**20)  # 4 MiB, freed before the others are made
        del first
        second = torch.ones(2**20)  # 4 MiB ...
        third = second * 2  # ... and 4 MiB more beside it: 8 held at once, 12 allocated in all
        return third

    assert abs(bench.allocated_peak_growth_mb(step) - 8.0) < 0.5


@pytest.mark.slow
def test_bench_prints_every_ratio_for_every_family():
    result = subprocess.run([sys.executable, "bench.py", "--resolution", "16", "--repeats", "1", "--fsdp-resolution", "16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("tiny ")] == ["SD", "SDXL", "SD3"]
    for label in ("(a) N=50 K=1:", "(a) N=10 K=1:", "(a) N=10 K=1 checkpointed:", "(a) N=50 K=10:",
                  "(a) N=50 K=10 checkpointed:", "(a) N=50 K=10 checkpointed with blocks:", "(b)", "(c)"):
        found = [line for line in lines if line.startswith(label)]
        assert len(found) == 3, (label, lines)
        for line in found:
            ratios = [float(v) for v in re.findall(r"= (\d+\.\d+)|(\d+\.\d+) \[", line) for v in v if v]
            assert ratios and all(math.isfinite(r) and r > 0 for r in ratios), line
    parts = [line for line in lines if line.startswith("parts")]
    assert len(parts) == 3
    for line in parts:
        units = [float(v) for v in re.findall(r"(?:merged|layers|off\)|bwd) (\d+\.\d+)", line)]
        assert len(units) == 5 and all(u > 0 for u in units), line
    # the reference trainer (trl's AlignPropTrainer) beside ours on the tiny SD, at every configuration
    reference = [line for line in lines if line.startswith("(r) N=")]
    assert [line.split(":")[0] for line in reference] == [
        "(r) N=50 K=1", "(r) N=10 K=1", "(r) N=10 K=1 checkpointed", "(r) N=50 K=10",
        "(r) N=50 K=10 checkpointed", "(r) N=50 K=10 checkpointed with blocks"], lines
    for line in reference:
        ratios = [float(v) for v in re.findall(r"= (\d+\.\d+)|KL (\d+\.\d+)", line) for v in v if v]
        assert len(ratios) == 4 and all(math.isfinite(r) and r > 0 for r in ratios), line
    assert "Writing model shards" not in result.stdout + result.stderr  # no loading bars in the report
    fsdp = [line for line in lines if line.startswith("full fine-tune on 2 processes")]
    assert len(fsdp) == 1
    ratios = [float(v) for v in re.findall(r"= (\d+\.\d+)", fsdp[0])]
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios), fsdp[0]
    startup = [line for line in lines if line.startswith("full fine-tune start-up")]
    assert len(startup) == 1
    ratios = [float(v) for v in re.findall(r"= (\d+\.\d+)", startup[0])]
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios), startup[0]


def test_real_shape_bench_runs_the_real_code_path_on_the_cpu_at_reduced_shapes(tmp_path):
    """bench.py --real builds a pipeline from its configs with random weights (here a tiny SD3's configs and a tiny
    CLIP as the reward, as configs/real's on a GPU) and trains it through training.build: every row is printed
    and appended to the table file."""
    import tiny_models
    import tiny_rewards

    model = tiny_models.make_tiny_sd3(str(tmp_path / "sd3"))
    clip = tiny_rewards.make_tiny_clip(str(tmp_path / "clip"))
    table = tmp_path / "table.md"
    result = subprocess.run([sys.executable, "bench.py", "--real", model, "--real-reward", clip, "--real-resolution", "32",
                             "--real-steps", "10", "--repeats", "1", "--real-table", str(table)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| sd3 |")]
    assert [row.split(" | ")[2] for row in rows] == [
        "pipeline sampling (no grad)", "DRaFT+ step K=1 with KL, --gradient-checkpointing --checkpoint-blocks",
        "DRaFT+ step K=1 without KL, --gradient-checkpointing --checkpoint-blocks", "DRaFT+ step K=1 with KL",
        "DRaFT+ step K=10 with KL, --gradient-checkpointing --checkpoint-blocks", "reward forward+backward"]
    for row in rows:
        seconds, peak = (float(v) for v in row.split(" | ")[3:5])
        assert seconds > 0 and peak > 0, row
    assert table.read_text().startswith("Measured ") and rows == [line for line in result.stdout.splitlines()
                                                                   if line.startswith("| sd3 |")]


def test_the_device_run_script_writes_the_table_on_the_cpu(tmp_path):
    """.ci/device-bench's CPU path: no wheels to install, two models (a tiny SD3's configs twice, standing in for
    configs/real), one table with one header, a row per measurement; a budget spent marks the rest unmeasured."""
    import tiny_models
    import tiny_rewards

    model = tiny_models.make_tiny_sd3(str(tmp_path / "sd3"))
    clip = tiny_rewards.make_tiny_clip(str(tmp_path / "clip"))
    table = tmp_path / "table.md"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "MODELS": f"{model} {model}", "BUDGET_S": "600",
           "BENCH_ARGS": f"--real-reward {clip} --real-resolution 32 --real-steps 10 --repeats 1"}
    result = subprocess.run([os.path.join(ROOT, ".ci", "device-bench"), str(table)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = table.read_text()
    assert text.count("Measured ") == 1 and text.count("| model |") == 1
    assert len([line for line in text.splitlines() if line.startswith("| sd3 |")]) == 12
    env["BUDGET_S"] = "10"
    subprocess.run([os.path.join(ROOT, ".ci", "device-bench"), str(table)], cwd=ROOT, env=env, capture_output=True,
                   timeout=60)
    assert table.read_text().count("not measured: the run's 10 s were spent") == 2
