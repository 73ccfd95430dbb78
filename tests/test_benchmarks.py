"""Smoke test of benchmarks/: each script runs with --quick (tiny zoo Flux, or the shipped digits DiT for
fidelity, or for gpu a tiny bf16 Flux with a guidance embedding on the CPU; no Inductor, no timing asserts), prints its markdown table and writes its JSON. They run
as parallel subprocesses."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("step_cost", "guard_cost", "end_to_end", "compile_health", "memory", "parallel", "fidelity", "peers",
           "scaling", "gpu", "prune_forms", "cold_start")

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick",
                                     "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in SCRIPTS}
    # one deadline for all: they share the CPUs, so the first one waited on must not get less time than the
    # last (a quiet 2-core machine runs them all in ~4 minutes)
    deadline, results = time.monotonic() + 900, {}
    for name, p in procs.items():
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
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
        few = conf["few_step"]
        few_rows = {r["method"].split(" (")[0]: r for r in few["rows"]}
        few_want = f"{len(few['cached_steps'])}/{few['steps']}"
        assert 0 < len(few["cached_steps"]) <= few["max_cached_steps"], name  # cache-dit's 8-step limits hold
        assert few_rows["cachedit-fx"]["cached steps"] == few_want, name
        assert all(r["cached steps"] == few_want for m, r in few_rows.items() if m.startswith("cache-dit 1.5.3 + "))
        assert len(few["sigmas"]) == few["steps"] + 1 and few["sigmas"][0] == 1.0 and few["sigmas"][-1] == 0.0


def test_peers_quick_threshold_centred(runs):
    """The bisected threshold moves to the middle of its gap between the compared diffs: same decisions,
    a margin above zero."""
    rc, _, path = runs["peers"]
    assert rc == 0
    for conf in json.loads(path.read_text())["configs"].values():
        for tuning in (conf["tuning"], conf["few_step"]["tuning"]):
            last = tuning[-1]
            assert last["centred"] and last["margin"] > 0 and last["cached"] == tuning[-2]["cached"]


def test_gpu_quick_every_peer_at_identical_decisions(runs):
    """gpu.py --quick runs the GPU script's code on the CPU: every caching variant (cachedit-fx, cache-dit
    where installed, FirstBlockCache at no warmup) cached the tuning run's steps in every request, the
    outputs stayed finite, and the plan and the CUDA-graphs finding are recorded."""
    rc, stdout, path = runs["gpu"]
    assert rc == 0, stdout[-3000:]
    data = json.loads(path.read_text())
    assert data["decision_mismatches"] == [] and data["cached_steps"]
    assert data["info"]["model"].endswith("bfloat16") and data["config"]["guidance_embeds"]
    want = f"{len(data['cached_steps'])}/{data['steps']}"
    rows = {r["method"]: r for r in data["rows"]}
    caching = ["cachedit-fx", "diffusers FirstBlockCache + torch.compile"]
    caching += ["cache-dit 1.5.3 + torch.compile"] if data["cache_dit"] else []
    assert all(rows[m]["cached steps"] == want for m in caching)
    assert rows["plain torch.compile"]["cached steps"] == f"0/{data['steps']}"
    assert all("compile s" in rows[m] and "first request s" in rows[m] for m in caching)
    assert data["cudagraphs_with_cond"][0] is False and "no CUDA" in data["cudagraphs_with_cond"][1]
    assert {"computed_step_s", "requests_s", "compile_s", "total_s"} <= set(data["plan"])
    assert "plan (H100 estimate)" in stdout and "cached steps (every caching variant" in stdout


def test_prune_forms_quick_counts(runs):
    """DBPrune's two forms on the tiny Flux (F1B0: 7 prunable blocks): the cond form has one cond per
    prunable block, the masked form none; both prune the same blocks (the script asserts the lists)."""
    rc, _, path = runs["prune_forms"]
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    forms = {(f, i) for f in ("cond", "masked") for i in ("eager", "aot_eager")}
    assert {(r["form"], r["inner"]) for r in rows} == forms
    for r in rows:
        assert r["conds"] == (7 if r["form"] == "cond" else 0), r
        assert r["pruned blocks per step"] == str([0, 0, 7, 7, 7, 7, 0, 7]), r
        assert r["max rel diff vs cond/eager"] <= 1e-5, r


def test_fidelity_quick_every_cell(runs):
    """Every indicator x calibrator cell has a row, and where cache-dit runs the same cell (DBCache F1B0
    with any calibrator) or diffusers its own indicator, both cache the same calls with the same PSNR at
    the same threshold (the decisions and outputs are the libraries')."""
    rc, _, path = runs["fidelity"]
    assert rc == 0
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    calibrators = ("", " + TaylorSeer O1", " + FoCa", " + DMD")
    for indicator in ("DBCache F1B0", "FirstBlockCache", "MagCache"):
        for cal in calibrators:
            assert f"cachedit-fx {indicator}{cal}" in rows, sorted(rows)
    peers = {f"cache-dit 1.5.3 DBCache F1B0{cal}": f"cachedit-fx DBCache F1B0{cal}" for cal in calibrators}
    peers.update({"diffusers FirstBlockCache": "cachedit-fx FirstBlockCache", "diffusers MagCache": "cachedit-fx MagCache"})
    for peer, mine in peers.items():
        if peer in rows and rows[peer]["threshold"] == rows[mine]["threshold"]:
            assert rows[peer]["cached calls"] == rows[mine]["cached calls"], (peer, rows[peer], rows[mine])
            assert abs(rows[peer]["PSNR dB"] - rows[mine]["PSNR dB"]) <= 1e-3, (peer, rows[peer], rows[mine])
