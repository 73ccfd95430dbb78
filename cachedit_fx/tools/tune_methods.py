"""Method search: which cache method (indicator x calibrator cell) and threshold reach a target speedup
with the best PSNR (or the highest speedup above a PSNR floor).

Each cell is installed once with ``enable_cache`` (one compile, on its first call), then ``tune`` searches
its threshold as for a single config: thresholds load into the compiled graph's state, so no graph is
compiled between them (each cell's ``graphs_compiled``). The pipeline is left with the winning cell
installed at its threshold.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import (INDICATORS, DBCacheConfig, DMDCalibratorConfig, FirstBlockCacheConfig, FoCaCalibratorConfig,
                      MagCacheConfig, TaylorSeerCalibratorConfig)
from ..errors import ConfigError
from ..install.api import cached_handles, disable_cache, enable_cache, refresh_context, summary
from .tune import Trial, TuneResult, tune

CALIBRATORS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "taylorseer": lambda: TaylorSeerCalibratorConfig(taylorseer_order=1),
    "foca": FoCaCalibratorConfig,
    "dmd": DMDCalibratorConfig,
}
# diffusers' defaults (retention 0.2, at most 3 steps skipped in a row) cap MagCache near 60 % cached
# calls; these let it reach the speedups the other indicators reach.
MAGCACHE = dict(retention_ratio=0.07, max_skip_steps=12)
METHODS = tuple(ind if cal == "none" else f"{ind}+{cal}" for ind in INDICATORS for cal in CALIBRATORS)


@dataclass
class Cell:
    """One method: its name (``indicator[+calibrator]``), the configs ``enable_cache`` gets, and why it
    was not tried (``skipped``; then the configs are None)."""

    name: str
    cache_config: DBCacheConfig | None
    calibrator_config: Any = None
    skipped: str | None = None


@dataclass
class CellResult:
    """A cell's threshold search (``tune``'s result), or the reason it was skipped."""

    cell: Cell
    result: TuneResult | None

    @property
    def chosen(self) -> Trial | None:
        return None if self.result is None else self.result.chosen

    @property
    def reached(self) -> bool:
        return self.result is not None and self.result.reached and self.chosen is not None


@dataclass
class MethodsResult:
    """Every cell's search, the winner (None when no cell meets the target) and why."""

    cells: list[CellResult]
    winner: CellResult | None
    message: str
    target: dict

    def table(self) -> str:
        """One row per cell with its chosen trial; the winner is marked ``*``."""
        head = ["method", "threshold", "cached calls", "speedup (blocks)", "PSNR dB"]
        scored = [c.result.score_name for c in self.cells if c.chosen is not None and c.chosen.score is not None]
        head += scored[:1]
        head += ["graphs compiled between thresholds", "reached", "note"]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in self.cells:
            t = c.chosen
            name = c.cell.name + (" *" if c is self.winner else "")
            if t is None:
                cells = [name, "-", "-", "-", "-"] + (["-"] if scored else [])
            else:
                cells = [name, f"{t.threshold:.4g}", f"{t.cached}/{t.calls}", f"{t.speedup:.2f}x",
                         "inf" if math.isinf(t.psnr) else f"{t.psnr:.2f}"]
                cells += [f"{t.score:.3f}" if t.score is not None else "-"] if scored else []
            compiled = "-" if c.result is None else str(c.result.graphs_compiled)
            note = c.cell.skipped if c.result is None else c.result.message
            cells += [compiled, "yes" if c.reached else "no", note.replace("|", "/")]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


def parse_methods(methods) -> list[str]:
    """``"all"``, one name or a list (or comma-separated string) of ``indicator[+calibrator]`` names.

    Returns:
        The names, in ``METHODS`` order as given; raises ``ConfigError`` naming the allowed values."""
    if isinstance(methods, str):
        methods = list(METHODS) if methods.strip() == "all" else [m for m in methods.split(",") if m.strip()]
    names = [str(m).strip().lower() for m in (methods or ())]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"methods: got {unknown or methods!r}; allowed: 'all' or a list of "
                          f"{', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def method_cells(methods="all", dbcache: DBCacheConfig | None = None, mag_ratios=None,
                 num_inference_steps: int | None = None) -> list[Cell]:
    """The cells to search.

    Args:
        methods: see :func:`parse_methods`.
        dbcache: the DBCache indicator's config (its Fn / Bn / warmup); default F1B0, warmup 2.
        mag_ratios: MagCache's calibrated ratios; without them (or ``num_inference_steps``) the MagCache
            cells are skipped with the reason.
        num_inference_steps: the step count of the calls MagCache's ratios are resampled to.

    Returns:
        One :class:`Cell` per name."""
    dbcache = dbcache or DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2)
    cells = []
    for name in parse_methods(methods):
        indicator, _, calibrator = name.partition("+")
        calibrator_config = CALIBRATORS[calibrator or "none"]()
        if indicator == "magcache" and (mag_ratios is None or num_inference_steps is None):
            cells.append(Cell(name, None, None, "skipped: MagCache needs calibrated mag_ratios and their "
                                                 "num_inference_steps (give mag_ratios=, or num_inference_steps "
                                                 "in call_kwargs to calibrate them)"))
            continue
        cache = {"dbcache": lambda: copy.deepcopy(dbcache),
                 "first_block": FirstBlockCacheConfig,
                 "magcache": lambda: MagCacheConfig(num_inference_steps=num_inference_steps,
                                                    mag_ratios=list(mag_ratios), **MAGCACHE)}[indicator]()
        cells.append(Cell(name, cache, calibrator_config))
    return cells


def calibrate_mag_ratios(pipe, call_kwargs: dict, compile: bool = True, inner: str = "inductor") -> list[float]:
    """MagCache's calibration run: one call of ``pipe(**call_kwargs)`` computing every step.

    Returns:
        The cond branch's per-step residual-magnitude ratios (``summary()``'s ``mag_ratios``); the
        calibration install is left on ``pipe`` (the next ``enable_cache`` replaces it)."""
    steps = call_kwargs.get("num_inference_steps")
    enable_cache(pipe, cache_config=MagCacheConfig(num_inference_steps=steps, calibrate=True),
                 compile=compile, inner=inner)
    generator = call_kwargs.get("generator")
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    pipe(**call_kwargs)
    if state is not None:
        generator.set_state(state)
    return list(summary(pipe, logging=False)[0].mag_ratios)


def choose(cells: list[CellResult], target_speedup: float | None) -> CellResult | None:
    """The winner among the cells that reached the target: the best PSNR (then speedup) when a speedup is
    the target, else (a PSNR floor alone) the highest speedup (then PSNR)."""
    reached = [c for c in cells if c.reached]
    if not reached:
        return None
    if target_speedup is not None:
        return max(reached, key=lambda c: (c.chosen.psnr, c.chosen.speedup))
    return max(reached, key=lambda c: (c.chosen.speedup, c.chosen.psnr))


def tune_methods(pipe, call_kwargs: dict, methods="all", target_speedup: float | None = None,
                 min_psnr: float | None = None, dbcache: DBCacheConfig | None = None, mag_ratios=None,
                 compile: bool = True, inner: str = "inductor", progress: bool = True, stream=None,
                 **tune_options) -> MethodsResult:
    """Search the cache method and its threshold: each cell installed once, its threshold tuned by ``tune``.

    Args:
        pipe: a diffusers pipeline (cached or not: each cell's ``enable_cache`` replaces the install).
        call_kwargs: one calibration call's arguments (fix the ``generator``'s seed), as for ``tune``.
        methods: ``"all"`` (every indicator x calibrator) or a list of ``METHODS`` names.
        target_speedup, min_psnr: ``tune``'s targets (at least one); the winner has the best PSNR among
            the cells reaching ``target_speedup`` (and ``min_psnr``), or with ``min_psnr`` alone the
            highest speedup keeping it.
        dbcache: the DBCache indicator's config (Fn / Bn / warmup); see :func:`method_cells`.
        mag_ratios: MagCache's ratios; None runs :func:`calibrate_mag_ratios` when a MagCache cell is asked.
        compile, inner: ``enable_cache``'s, for every cell.
        progress, stream: a line per cell and ``tune``'s progress bar on ``stream`` (default stderr).
        tune_options: ``tune``'s other options (``max_trials``, ``max_threshold``, ``score`` ...).

    Returns:
        :class:`MethodsResult`; the pipeline keeps the winner installed at its threshold (with no winner,
        the install found on entry, re-installed, or none).
    """
    if target_speedup is None and min_psnr is None:
        raise ConfigError("tune_methods: give target_speedup and / or min_psnr (a method is chosen by them)")
    names = parse_methods(methods)
    refused = sorted(set(tune_options) & {"apply", "plot"})
    if refused:
        raise ConfigError(f"tune_methods: {', '.join(refused)} are tune's for one method (the winner is applied; "
                          "MethodsResult.cells[i].result.plot(path) draws a cell's frontier)")
    stream = sys.stderr if stream is None else stream
    before = [(h.cache_config, h.calibrator_config) for _, h in cached_handles(pipe)][:1]
    steps = call_kwargs.get("num_inference_steps")
    if mag_ratios is None and steps is not None and any(n.startswith("magcache") for n in names):
        mag_ratios = calibrate_mag_ratios(pipe, call_kwargs, compile, inner)
    cells, results = method_cells(names, dbcache, mag_ratios, steps), []
    for i, cell in enumerate(cells):
        if cell.skipped:
            results.append(CellResult(cell, None))
            continue
        if progress:
            print(f"tune: method {i + 1}/{len(cells)} {cell.name}", file=stream, flush=True)
        enable_cache(pipe, cache_config=cell.cache_config, calibrator_config=cell.calibrator_config,
                     compile=compile, inner=inner)
        results.append(CellResult(cell, tune(pipe, call_kwargs, target_speedup=target_speedup, min_psnr=min_psnr,
                                             progress=progress, stream=stream, **tune_options)))
    winner = choose(results, target_speedup)
    _leave_installed(pipe, winner, results, before, compile, inner)
    message = ("no method reaches the target" if winner is None else
               f"{winner.cell.name} at threshold {winner.chosen.threshold:.4g}: {winner.chosen.speedup:.2f}x, "
               f"PSNR {winner.chosen.psnr:.2f} dB")
    return MethodsResult(results, winner, message, {"target_speedup": target_speedup, "min_psnr": min_psnr})


def _leave_installed(pipe, winner: CellResult | None, results: list[CellResult], before: list, compile: bool,
                     inner: str) -> None:
    """The winner installed at its threshold (already so when it was the last cell searched); with no
    winner, the install found on entry (or none)."""
    tried = [c for c in results if c.result is not None]
    if winner is not None:
        if not tried or winner is not tried[-1]:  # another cell is installed: install the winner again
            enable_cache(pipe, cache_config=winner.cell.cache_config,
                         calibrator_config=winner.cell.calibrator_config, compile=compile, inner=inner)
        refresh_context(pipe, residual_diff_threshold=winner.chosen.threshold)
    elif before:
        enable_cache(pipe, cache_config=before[0][0], calibrator_config=before[0][1], compile=compile, inner=inner)
    else:
        disable_cache(pipe)
