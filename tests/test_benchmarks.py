"""Smoke test of benchmarks/: each script runs with --quick (tiny zoo Flux, or the shipped digits DiT for
fidelity; no Inductor, no timing asserts), prints its markdown table and writes its JSON. The six run
as parallel subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("step_cost", "end_to_end", "compile_health", "memory", "parallel", "fidelity")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick",
                                     "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in SCRIPTS}
    results = {}
    for name, p in procs.items():
        try:
            stdout, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        results[name] = (p.returncode, stdout, out / f"{name}.json")
    return results


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick(runs, name):
    rc, stdout, path = runs[name]
    assert rc == 0, stdout[-3000:]
    assert f"## {name}" in stdout and "|---|" in stdout, stdout[-2000:]
    data = json.loads(path.read_text())
    assert data["benchmark"] == name and data["quick"] is True
    assert data["machine"]["torch"]


def test_compile_health_quick_counts(runs):
    rc, _, path = runs["compile_health"]
    assert rc == 0
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    c = rows["cachedit-fx"]
    assert c["graph breaks"] == 0 and c["recompiles (request 2)"] == 0
    assert c["backend compilations (request 1)"] == 1
