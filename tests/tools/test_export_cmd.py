"""``cachedit-fx export``'s arguments: --dynamic into shared dims, and one-line errors for bad flags and
factory models (the export itself: tests/export)."""
from __future__ import annotations

import os

from tests.helpers.cli import assert_one_line_error, run


def test_export_dynamic_flag_parses_into_shared_dims():
    from torch.export import Dim

    from cachedit_fx.export.shapes import parse_cli

    spec = parse_cli(["hidden_states:1:tokens", "img_ids:0:tokens", "hidden_states:0"])
    assert spec["hidden_states"][1] is spec["img_ids"][0]
    assert isinstance(spec["hidden_states"][0], Dim) and spec["hidden_states"][0] is not spec["hidden_states"][1]


def test_export_bad_dynamic_flag_is_one_line_error(capsys, tmp_path):
    rc, _, err = run(capsys, "export", "--model", "flux", "--out", str(tmp_path / "m.pt2"), "--dynamic", "tokens")
    assert_one_line_error(rc, err, "--dynamic 'tokens'", "ARG:DIM")
    assert not (tmp_path / "m.pt2").exists()


def test_export_of_a_factory_model_errors_are_one_line(capsys, tmp_path):
    out = str(tmp_path / "m.pt2")
    rc, _, err = run(capsys, "export", "--out", out)
    assert_one_line_error(rc, err, "--model MODEL, or --config package.module:Factory")
    rc, _, err = run(capsys, "export", "--config", "tests.helpers.tinydit:cross_dit", "--out", out)
    assert_one_line_error(rc, err, "--args NAME=SHAPE")
    rc, _, err = run(capsys, "export", "--config", "tests.helpers.tinydit:cross_dit", "--args", "x=1xq", "--out", out)
    assert_one_line_error(rc, err, "expected NAME=SHAPE[:DTYPE]")
    rc, _, err = run(capsys, "export", "--config", "tests.helpers.tinydit:no_such_factory", "--args", "x=1x8x16", "--out", out)
    assert_one_line_error(rc, err, "has no attribute 'no_such_factory'")
    assert not os.path.exists(out)
