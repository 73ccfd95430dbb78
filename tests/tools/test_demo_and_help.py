"""The ``cachedit-fx`` command line: the demo on the shipped digits model, help for every command, usage
errors on one line, in process and from the installed console script."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers.cli import assert_one_line_error, run


# ----------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_caches_the_trained_digits_model_and_writes_one_png(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the demo's classifier needs scikit-learn")
    out = tmp_path / "demo.png"
    # 8 steps move the latent more per step than 28: the diffs are ~0.3-0.6, so a threshold above the usual
    rc, stdout, _ = run(capsys, "demo", "--inner", "eager", "--steps", "8", "--size", "32", "--warmup", "2",
                        "--rows", "1", "--threshold", "0.45", "--reps", "3", "--out", str(out))
    assert rc == 0, stdout
    cached, steps = map(int, stdout.split("cached steps ")[1].split()[0].split("/"))
    assert steps == 8 and 0 < cached < 8
    uncond = int(stdout.split("(uncond ")[1].split("/")[0])
    assert 0 < uncond < 8  # separate CFG: the uncond calls cache on their own state
    psnr = float(stdout.split("PSNR ")[1].split()[0])
    assert 20 < psnr < float("inf") and "SSIM" in stdout and "speedup" in stdout
    accuracy = [float(x.rstrip("%")) for x in stdout.split("classifier accuracy: ")[1].split()[1:4:2]]
    assert len(accuracy) == 2 and min(accuracy) >= 80
    _assert_timing_lines(stdout, reps=3)
    _assert_blocks_line(stdout, calls=2 * 8, chain_blocks=8, cached_calls=cached + uncond)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1200, 500)


def _seconds(text: str) -> float:
    return float(text.rstrip("s"))


def _assert_timing_lines(stdout: str, reps: int) -> None:
    """The medians of the interleaved repetitions: the summary line's times are the timing line's
    medians, each inside its min-max, and the speedup is their ratio (consistency, not a speed)."""
    summary = stdout.split("uncached ")[1].split()
    t_base, t_cached, speedup = _seconds(summary[0]), _seconds(summary[2]), float(summary[4].rstrip("x"))
    assert abs(speedup - t_base / t_cached) <= 0.01 + 0.01 * speedup
    timing = stdout.split("timing: ")[1].splitlines()[0]
    assert f"medians of {reps} interleaved repetitions after a warm-up" in timing
    for label, median in (("uncached", t_base), ("cached", t_cached)):
        parts = timing.split(f" {label} ")[1].split()
        low, high = map(float, parts[1].strip("()").split("-"))
        assert _seconds(parts[0]) == pytest.approx(median, abs=1e-3) and low <= median <= high
    low, high = map(float, timing.split("speedup per repetition ")[1].rstrip("x").split("-"))
    assert 0 < low <= high


def _assert_blocks_line(stdout: str, calls: int, chain_blocks: int, cached_calls: int) -> None:
    """The speedup in blocks run follows from the cached calls: a cached call runs Fn (1 block of F1B0)."""
    line = stdout.split("blocks run: ")[1].splitlines()[0].split()
    uncached, cached, in_blocks = int(line[1]), int(line[3]), float(line[7].rstrip("x"))
    assert uncached == calls * chain_blocks
    assert cached == (calls - cached_calls) * chain_blocks + cached_calls * 1
    assert in_blocks == pytest.approx(uncached / cached, abs=0.006)
    assert "wall-clock" in stdout.split("blocks run: ")[1].splitlines()[0]


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["demo"], ["tune"], ["diff"], ["trace"], ["metrics"]])
def test_help_for_every_command(capsys, command):
    rc, out, _ = run(capsys, *command, "--help")
    assert rc == 0
    assert out.startswith("usage: cachedit-fx")


def test_metrics_help_says_how_videos_are_read(capsys):
    _, out, _ = run(capsys, "metrics", "--help")
    text = " ".join(out.split())
    assert "GIF" in text and "mp4" in text and "folders of frames" in text
    assert "installed here" in text


def test_usage_error_is_one_line(capsys):
    rc, _, err = run(capsys, "metrics", "nosuchmetric", "a.png", "b.png")
    assert_one_line_error(rc, err, "invalid choice")
    rc, _, err = run(capsys, "diff")
    assert_one_line_error(rc, err, "model")


def test_console_script_error_is_one_stderr_line(tmp_path):
    """The installed entry point, out of process: one line on stderr, nothing else, non-zero exit."""
    exe = shutil.which("cachedit-fx")
    cmd = [exe] if exe else [sys.executable, "-m", "cachedit_fx.tools.cli"]
    proc = subprocess.run(cmd + ["metrics", "psnr", str(tmp_path / "nope.png"), str(tmp_path / "nope2.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cachedit-fx metrics: no such file or folder: {tmp_path / 'nope.png'}"]
