"""The README's used-by snippets really run (with the fast inner compilers they name)."""
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _snippets():
    """Each snippet's index, marked slow (a zoo model end to end); export and inductor for the one that builds
    an AOTInductor package."""
    return [pytest.param(i, marks=[pytest.mark.slow] + ([pytest.mark.export, pytest.mark.inductor]
                                                       if "export(" in block else []))
            for i, block in enumerate(_python_blocks())]


@pytest.mark.parametrize("index", _snippets())
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write files (the export package)
    # About Dynamo's caches: a snippet is a user's literal code, run as in the fresh process a reader runs
    # it in. Its torch.compile compiles the transformer class's shared forward code (no private copy), so
    # Dynamo's caches start empty for it: other tests' compiles of that class must not count against its
    # recompile_limit.
    torch._dynamo.reset()
    scope: dict = {}
    exec(compile(_python_blocks()[index], f"README-snippet-{index}", "exec"), scope)
    if "outputs" in scope:
        assert len(scope["outputs"]) == 8
    if "image" in scope:
        assert torch.isfinite(scope["image"]).all()
    import cachedit_fx

    if "stats" in scope:  # the snippet read the summary before disabling the cache
        rows = scope["stats"]
    else:
        rows = cachedit_fx.summary(scope.get("pipe", scope.get("transformer")), details=True, logging=False)
    assert any(r.cached_steps for r in rows), rows


@pytest.mark.slow
def test_cli_diff_json_lists_chain(capsys):
    import json

    from cachedit_fx.tools.cli import main

    assert main(["diff", "flux", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    chain = report["chains"][0]
    assert chain["pattern"] == "1→1" and chain["n_blocks"] == 8
    assert chain["cut"] == {"Fn": [0, 0], "middle": [1, 7], "Bn": None}
    targets = {i["target"] for i in chain["inserted"]}
    assert {"cond", "cachedit_pre_step_0", "cachedit_post_step_0"} <= targets


def test_cli_diff_bad_model_exits_nonzero(capsys):
    from cachedit_fx.tools.cli import main

    assert main(["diff", "no-such-model"]) == 2
    assert "unknown zoo model" in capsys.readouterr().err
