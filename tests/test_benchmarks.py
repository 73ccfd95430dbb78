"""Smoke test of benchmarks/: each script runs with --quick (tiny zoo Flux, or the shipped digits DiT for
fidelity; no Inductor, no timing asserts), prints its markdown table and writes its JSON. They run
as parallel subprocesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("step_cost", "end_to_end", "compile_health", "memory", "parallel", "fidelity", "peers", "scaling",
           "cold_start")

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


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


def test_peers_quick_same_decisions(runs):
    """cachedit-fx and cache-dit (both compile modes) report the same cached count as the tuning run (the
    script asserts the step lists; here: the rows are there, and cache-dit's only where it is installed)."""
    rc, _, path = runs["peers"]
    assert rc == 0
    data = json.loads(path.read_text())
    for name, conf in data["configs"].items():
        rows = {r["method"].split(" (")[0]: r for r in conf["rows"]}
        want = f"{len(conf['cached_steps'])}/{data['steps']}"
        assert conf["cached_steps"] and rows["cachedit-fx"]["cached steps"] == want, name
        peers = [r for m, r in rows.items() if m.startswith("cache-dit 1.5.3 + ")]
        assert len(peers) == (2 if data["cache_dit"] else 0), name
        assert all(r["cached steps"] == want for r in peers), name
