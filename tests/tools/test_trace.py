"""``cachedit-fx trace``: the per-step decision table (text and JSON, both CFG branches) and its plot;
errors on one line."""
from __future__ import annotations

import json

import pytest

from tests.helpers.cli import assert_one_line_error, assert_png, run


def test_trace_prints_decision_table_with_cached_step(capsys, tmp_path):
    plot = tmp_path / "trace.png"
    rc, out, err = run(capsys, "trace", "dit", "--steps", "5", "--threshold", "0.5", "--warmup", "2",
                       "--plot", str(plot))
    assert rc == 0, err
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:2] == ["step", "branch"])
    assert lines[header].split() == ["step", "branch", "timestep", "diff", "threshold", "gate", "cached"]
    rows = [l.split() for l in lines[header + 2: header + 7]]
    assert [int(r[0]) for r in rows] == list(range(5))
    assert [r[5] for r in rows[:2]] == ["warmup", "warmup"] and [r[6] for r in rows[:2]] == ["no", "no"]
    assert all(r[4] == "0.5" for r in rows)
    cached = [r for r in rows if r[6] == "yes"]
    assert cached, out
    for r in cached:  # a step cached by the diff test had a diff below the threshold
        assert r[5] == "diff_test" and float(r[3]) < 0.5
    n_cached = len(cached)
    assert f"cached {n_cached}/5 steps" in out
    assert_png(plot)


@pytest.mark.slow
def test_trace_separate_cfg_json(capsys):
    rc, out, err = run(capsys, "trace", "wan", "--steps", "4", "--threshold", "0.5", "--format", "json",
                       "--plot", "")
    assert rc == 0, err
    report = json.loads(out)
    assert report["plot"] is None
    branches = {c["branch"]: c for c in report["chains"]}
    assert set(branches) == {"cond", "uncond"}
    for c in branches.values():
        assert c["steps"] == 4 and [r["step"] for r in c["rows"]] == [0, 1, 2, 3]
        assert c["rows"][0]["gate"] == "warmup" and c["rows"][0]["diff"] is None
        assert [r["timestep"] for r in c["rows"]] == [1000.0, 750.0, 500.0, 250.0]
        assert c["cached_steps"] == sum(r["cached"] for r in c["rows"])


def test_trace_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "trace", "sd3", "--fn", "3", "--bn", "2", "--steps", "2", "--plot", "")
    assert_one_line_error(rc, err, "do not fit")
    rc, _, err = run(capsys, "trace", "no-such-model")
    assert_one_line_error(rc, err, "unknown zoo model")
    rc, _, err = run(capsys, "trace", "sd3", "--steps", "0")
    assert_one_line_error(rc, err, "--steps")
