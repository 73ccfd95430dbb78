"""The ``cachedit-fx tune`` command on the shipped digits DiT: a speedup out of reach exits 1 with the reason,
the trials' table and the frontier plot (tune itself, on a cached pipeline: tests/digits/test_digits.py).
Needs scikit-learn."""
from __future__ import annotations

import pytest

pytest.importorskip("sklearn", reason="scikit-learn (pip install 'cachedit-fx[cli]')")

pytestmark = pytest.mark.slow


def test_tune_command_exits_1_with_the_reason_when_the_target_is_out_of_reach(capsys, tmp_path):
    from cachedit_fx.tools.cli import main

    plot = tmp_path / "frontier.png"
    rc = main(["tune", "--target-speedup", "50", "--steps", "8", "--rows", "1", "--trials", "1",
               "--max-threshold", "0.5", "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert rc == 1 and "not reached: cannot reach 50.00x" in out and "graphs compiled during the trials: 0" in out
    assert "| 0.5 * | " in out and "tune [" in err and plot.stat().st_size > 0


def test_tune_methods_command_prints_every_cell_and_installs_the_winner(capsys):
    from cachedit_fx.tools.cli import main

    rc = main(["tune", "--methods", "dbcache,first_block+taylorseer", "--target-speedup", "1.5", "--steps", "8",
               "--rows", "1", "--trials", "3"])
    out, err = capsys.readouterr()
    assert rc == 0 and "| dbcache |" in out.replace(" * |", " |") and "| first_block+taylorseer" in out
    assert out.count(" * | ") == 1 and "winner: " in out and "installed: " in out
    assert "graphs compiled between thresholds" in out and "tune: method 2/2 first_block+taylorseer" in err
