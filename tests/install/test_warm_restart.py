"""Warm restarts: a second process finds the cached graph in the compile caches and compiles nothing new,
on the same Inductor cache directory and on a fresh one loaded from ``torch.compiler.save_cache_artifacts``;
its decisions and outputs equal the cold process's (the zoo Flux under enable_cache with Inductor, each
process a fresh interpreter: tests/helpers/warm_start.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.inductor, pytest.mark.multiprocess]


def start(cache_dir: Path, *args: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "tests.helpers.warm_start", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    artifacts = root / "artifacts.bin"
    cold = start(root / "cache", "--save", str(artifacts))
    same_dir = start(root / "cache")
    loaded = start(root / "fresh", "--load", str(artifacts))
    return cold, same_dir, loaded


def test_the_cold_process_compiles_the_graph_with_its_blocks_as_regions(processes):
    cold, _, _ = processes
    assert cold["fx_miss"] == 1 and cold["fx_hit"] == 0 and cold["fx_bypass"] == 0, cold
    assert cold["aot_miss"] == 1 and cold["aot_bypass"] == 0, cold  # AOTAutograd keys the graph (steps.py)
    assert cold["regions"] > 0 and cold["cached_steps"], cold


@pytest.mark.parametrize("which", ["same_dir", "loaded"])
def test_a_restart_hits_the_on_disk_caches_and_decides_the_same(processes, which):
    cold, same_dir, loaded = processes
    warm = same_dir if which == "same_dir" else loaded
    assert warm["fx_hit"] == 1 and warm["fx_miss"] == 0, warm
    assert warm["aot_hit"] == 1 and warm["aot_miss"] == 0, warm  # no AOTAutograd trace on a restart
    assert warm["cached_steps"] == cold["cached_steps"] and warm["output"] == cold["output"], (cold, warm)
