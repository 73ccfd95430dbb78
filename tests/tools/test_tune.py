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
