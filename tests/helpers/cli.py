"""Driving the ``cachedit-fx`` command line in process, and what its outputs must look like: one-line
errors, PNG files."""
from __future__ import annotations

import shutil

import pytest
from PIL import Image

from cachedit_fx.tools.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="png/svg are laid out by Graphviz's dot")


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles, code=2):
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("cachedit-fx ")
    for n in needles:
        assert n in lines[0], lines[0]


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
