"""tune_methods: which cache method (indicator x calibrator) and threshold meet a target. The cells and
the choice on their own (fast); on the shipped digits DiT (slow, eager inner, 8 steps, 10 digits): each
cell compiles once and none between thresholds, the winner is the best PSNR among the cells reaching the
target, and it is what the pipeline is left with. Needs scikit-learn for the digits part."""
from __future__ import annotations

import math

import pytest
import torch

import cachedit_fx
from cachedit_fx import ConfigError, FirstBlockCacheConfig, MagCacheConfig
from cachedit_fx.tools.tune import Trial, TuneResult
from cachedit_fx.tools.tune_methods import (METHODS, Cell, CellResult, choose, method_cells, parse_methods,
                                            tune_methods)

STEPS = 8
LABELS = list(range(10))
TRIED = ["dbcache", "dbcache+taylorseer", "first_block+foca", "magcache"]


def test_unknown_method_is_a_config_error_naming_the_field_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"methods: got \['dbcache\+bogus'\]; allowed: 'all' or .*first_block\+dmd"):
        parse_methods("dbcache, dbcache+bogus")
    with pytest.raises(ConfigError, match="methods"):  # before the pipeline is touched
        tune_methods(object(), {}, methods=["taylorseer"], target_speedup=2.0)
    with pytest.raises(ConfigError, match="target_speedup and / or min_psnr"):
        tune_methods(object(), {}, methods="all")
    with pytest.raises(ConfigError, match="apply, plot are tune's for one method"):
        tune_methods(object(), {}, methods="all", min_psnr=30, plot="x.png", apply=False)


def test_all_is_every_indicator_by_calibrator_and_magcache_without_ratios_says_why():
    assert parse_methods("all") == list(METHODS) and len(METHODS) == 12
    cells = method_cells("all")
    skipped = [c.name for c in cells if c.skipped]
    assert skipped == ["magcache", "magcache+taylorseer", "magcache+foca", "magcache+dmd"]
    assert all("mag_ratios" in c.skipped and c.cache_config is None for c in cells if c.skipped)
    cells = {c.name: c for c in method_cells("all", mag_ratios=[1.0, 0.9, 0.8], num_inference_steps=STEPS)}
    assert not any(c.skipped for c in cells.values())
    assert isinstance(cells["first_block+foca"].cache_config, FirstBlockCacheConfig)
    assert type(cells["first_block+foca"].calibrator_config).__name__ == "FoCaCalibratorConfig"
    assert isinstance(cells["magcache+dmd"].cache_config, MagCacheConfig)
    assert cells["magcache"].calibrator_config is None
    assert cells["dbcache"].cache_config is not cells["dbcache+dmd"].cache_config  # refresh_context edits one only


def _cell(name: str, speedup: float, psnr: float, reached: bool) -> CellResult:
    trial = Trial(0.1, 4, 8, speedup, 0.0, psnr)
    return CellResult(Cell(name, None), TuneResult([trial], trial, reached, "", 0))


def test_the_winner_is_the_best_psnr_among_the_cells_reaching_the_target():
    cells = [_cell("a", 2.0, 30.0, True), _cell("b", 2.05, 33.0, True), _cell("c", 1.2, 45.0, False),
             CellResult(Cell("magcache", None, skipped="skipped"), None)]
    assert choose(cells, target_speedup=2.0).cell.name == "b"  # c keeps more PSNR but misses the speedup
    assert choose(cells, target_speedup=None).cell.name == "b"  # a PSNR floor alone: the fastest keeping it
    cells[0].result.trials[0].speedup = 3.0
    assert choose(cells, target_speedup=None).cell.name == "a"
    assert choose(cells[2:], target_speedup=2.0) is None


@pytest.fixture(scope="module")
def searched():
    """tune_methods on the digits DiT over TRIED, counting the inner compiler's compiles."""
    pytest.importorskip("sklearn", reason="scikit-learn (pip install 'cachedit-fx[cli]')")
    from cachedit_fx.digits import load_digits_pipeline

    torch.set_num_threads(1)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(labels=LABELS, num_inference_steps=STEPS, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="pt")
    result = tune_methods(pipe, call, methods=TRIED, target_speedup=1.5, inner=counting, max_trials=3,
                          progress=False)
    return pipe, call, result, compiles


@pytest.mark.slow
def test_each_cell_compiles_once_and_never_between_thresholds(searched):
    _, _, result, compiles = searched
    assert [c.cell.name for c in result.cells] == TRIED and not any(c.cell.skipped for c in result.cells)
    assert all(c.result.graphs_compiled == 0 and len(c.result.trials) >= 3 for c in result.cells)
    # every cell's threshold 0 caches nothing: its PSNRs are against the uncached images, comparable across cells
    assert all(c.result.trials[0].threshold == 0 and c.result.trials[0].cached == 0 for c in result.cells)
    assert len(compiles) == 1 + len(TRIED)  # MagCache's calibration run, then one per cell
    assert "| graphs compiled between thresholds |" in result.table()


@pytest.mark.slow
def test_the_winner_is_the_best_psnr_cell_meeting_the_target(searched):
    _, _, result, _ = searched
    reached = [c for c in result.cells if c.reached]
    assert reached and result.winner in reached
    assert all(abs(c.chosen.speedup - 1.5) <= 0.1 for c in reached)
    assert result.winner.chosen.psnr == max(c.chosen.psnr for c in reached)
    assert f"| {result.winner.cell.name} * |" in result.table()
    assert math.isfinite(result.winner.chosen.psnr) and result.winner.cell.name in result.message


@pytest.mark.slow
def test_the_pipeline_is_left_with_the_winner_at_its_threshold(searched):
    pipe, call, result, _ = searched
    (_, handle), = cachedit_fx.install.api.cached_handles(pipe)
    winner = result.winner
    assert type(handle.cache_config) is type(winner.cell.cache_config)
    assert type(handle.calibrator_config) is type(winner.cell.calibrator_config)
    assert handle.cache_config.residual_diff_threshold == winner.chosen.threshold
    call["generator"].manual_seed(0)
    pipe(**call)
    stats = cachedit_fx.summary(pipe, logging=False)
    assert sum(len(s.cached_steps) + len(s.cfg_cached_steps) for s in stats) == winner.chosen.cached
    assert f"R{winner.chosen.threshold}" in cachedit_fx.strify(pipe)


def test_the_methods_command_checks_its_arguments_before_loading_the_model(capsys):
    from cachedit_fx.tools.cli import main

    assert main(["tune", "--methods", "dbcache,nope", "--target-speedup", "2"]) == 2
    assert "methods: got ['nope']; allowed: 'all' or a list of dbcache" in capsys.readouterr().err
    assert main(["tune", "--methods", "all"]) == 2
    assert "--methods needs --target-speedup" in capsys.readouterr().err
