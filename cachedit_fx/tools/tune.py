"""Threshold auto-tuning: a few calibration calls of a cached pipeline pick ``residual_diff_threshold``
for a target speedup and / or a PSNR floor.

Every trial loads its threshold into the compiled graph's state (``refresh_context``: a number, no
recompile), runs the pipeline once and reads the cached steps back. The first trial, threshold 0,
caches nothing: it is the reference the PSNR of the others is measured against.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError
from ..install.api import cached_handles, refresh_context, summary
from ..runtime.stats import pyplot
from .metrics import psnr

SWEEP = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3, 0.5)  # the thresholds a sweep without a target tries


@dataclass
class Trial:
    """One calibration call: its threshold, the calls it cached of all calls (both CFG branches), the
    speedup the skipped blocks give (blocks run uncached / blocks run), the call's seconds, its PSNR
    against the uncached reference (images in [0, 1]) and the ``score`` callable's value."""

    threshold: float
    cached: int
    calls: int
    speedup: float
    seconds: float
    psnr: float
    score: float | None = None


@dataclass
class TuneResult:
    """The trials sorted by threshold (the frontier), the chosen one and whether it met the target."""

    trials: list[Trial]
    chosen: Trial | None
    reached: bool
    message: str
    graphs_compiled: int  # graphs compiled during the trials: 0 (thresholds are state, not code)
    score_name: str = "score"
    target: dict = field(default_factory=dict)

    def table(self) -> str:
        """The frontier as a markdown table; the chosen row is marked."""
        head = ["threshold", "cached calls", "speedup (blocks)", "seconds", "PSNR dB"]
        head += [self.score_name] if any(t.score is not None for t in self.trials) else []
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in self.trials:
            cells = [f"{t.threshold:.4g}" + (" *" if t is self.chosen else ""), f"{t.cached}/{t.calls}",
                     f"{t.speedup:.2f}x", f"{t.seconds:.2f}", "inf" if math.isinf(t.psnr) else f"{t.psnr:.2f}"]
            cells += [f"{t.score:.3f}" if t.score is not None else "-"] if len(head) > 5 else []
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def plot(self, path: str) -> str:
        """Speedup and PSNR against the threshold, the chosen trial marked; returns ``path``."""
        plt = pyplot()

        trials = [t for t in self.trials if t.threshold > 0]
        x = [t.threshold for t in trials]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(x, [t.speedup for t in trials], "o-", color="tab:blue", label="speedup (blocks)")
        ax.set_xlabel("residual_diff_threshold")
        ax.set_ylabel("speedup (x)", color="tab:blue")
        right = ax.twinx()
        right.plot(x, [min(t.psnr, 99.0) for t in trials], "s--", color="tab:red", label="PSNR")
        right.set_ylabel("PSNR vs uncached (dB)", color="tab:red")
        if self.chosen is not None and self.chosen.threshold > 0:
            ax.axvline(self.chosen.threshold, color="k", linestyle=":", label=f"chosen {self.chosen.threshold:.3g}")
        ax.legend(loc="upper left", fontsize=7)
        ax.set_title("cachedit-fx tune: threshold frontier")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def images_01(output) -> np.ndarray:
    """A pipeline's images as a float array in [0, 1]: "pt" / "np" outputs as they are, PIL images / 255."""
    for key in ("images", "frames"):
        if hasattr(output, key):
            output = getattr(output, key)
            break
    else:
        output = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(output, torch.Tensor):
        return output.detach().cpu().float().numpy()
    if isinstance(output, (list, tuple)) and output and hasattr(output[0], "mode"):  # PIL images
        return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in output])
    return np.asarray(output, dtype=np.float32)


def blocks_speedup(stats) -> tuple[int, int, float]:
    """(cached calls, calls, blocks run uncached / blocks run) over every chain and CFG branch of
    ``summary()``'s stats; under DBPrune a cached call is one that pruned a block, and the blocks not
    run are the pruned ones."""
    cached = calls = full = run = 0
    for s in stats:
        if s.unmatched:
            continue
        n_cached = len(s.cached_steps) + len(s.cfg_cached_steps)
        n_calls = s.steps + s.cfg_steps
        cached, calls = cached + n_cached, calls + n_calls
        full += n_calls * s.n_blocks
        pruned = s.pruned_blocks + s.cfg_pruned_blocks  # per call: empty unless DBPrune
        run += n_calls * s.n_blocks - (sum(pruned) if pruned else n_cached * (s.n_blocks - s.Fn - s.Bn))
    return cached, calls, (full / run if run else 1.0)


def _progress(done: int, total: int, trial: Trial, score_name: str, stream) -> None:
    width = 20
    filled = round(width * done / total)
    score = f", {score_name} {trial.score:.3f}" if trial.score is not None else ""
    print(f"tune [{'#' * filled}{'-' * (width - filled)}] {done}/{total}  threshold {trial.threshold:.4g}: "
          f"cached {trial.cached}/{trial.calls}, {trial.speedup:.2f}x, PSNR {trial.psnr:.2f} dB{score}",
          file=stream, flush=True)


def tune(pipe, call_kwargs: dict, target_speedup: float | None = None, min_psnr: float | None = None,
         max_trials: int = 8, max_threshold: float = 1.0, tolerance: float = 0.1,
         max_warmup_steps: int | None = None, score: Callable[[Any], float] | None = None,
         score_name: str = "score", apply: bool = True, progress: bool = True, plot: str | None = None,
         stream=None) -> TuneResult:
    """Pick the ``residual_diff_threshold`` of a pipeline cached by ``enable_cache``.

    With ``target_speedup`` the threshold is bisected until the speedup is within ``tolerance`` of it;
    with ``min_psnr`` alone, to the largest threshold whose images keep that PSNR against uncached;
    with both, the speedup is sought and the PSNR floor checked; with neither, a sweep of ``SWEEP``.

    Args:
        pipe: a pipeline (or transformer) already cached by ``enable_cache``; its Fn / Bn, inner
            compiler and calibrator stay as they are.
        call_kwargs: the arguments of one calibration call (fix ``generator``'s seed for comparable
            trials: each trial gets a fresh copy of a ``torch.Generator`` given here).
        target_speedup: the wanted speedup in blocks run (uncached / cached), e.g. 2.0.
        min_psnr: the PSNR floor (dB) of the cached images against the uncached reference.
        max_trials: calibration calls after the reference (each one pipeline call).
        max_threshold: the largest threshold tried.
        tolerance: how close to ``target_speedup`` counts as reached.
        max_warmup_steps: set for every trial (a number, no recompile); None keeps the current one.
        score: a callable of a call's output returning a quality number (higher is better), e.g. a
            classifier's accuracy; reported per trial.
        apply: leave the chosen threshold in force (else the one before tuning).
        progress: a text progress bar over the trials on ``stream`` (default stderr).
        plot: write the frontier plot to this path.

    Returns:
        :class:`TuneResult`; ``reached`` is False, with the reason in ``message``, when no tried
        threshold meets the target.
    """
    handles = [h for _, h in cached_handles(pipe)]
    if not handles:
        raise ConfigError(f"tune: {type(pipe).__name__} is not cached (call cachedit_fx.enable_cache first)")
    if target_speedup is not None and not target_speedup >= 1.0:
        raise ConfigError(f"tune: target_speedup must be a number >= 1.0, got {target_speedup!r}")
    if max_trials < 1:
        raise ConfigError(f"tune: max_trials must be >= 1, got {max_trials!r}")
    stream = sys.stderr if stream is None else stream
    before = handles[0].cache_config.residual_diff_threshold
    generator = call_kwargs.get("generator")
    seed_state = generator.get_state() if isinstance(generator, torch.Generator) else None
    trials: list[Trial] = []
    reference: list[np.ndarray] = []

    def run(threshold: float) -> Trial:
        fields = {"residual_diff_threshold": float(threshold)}
        if max_warmup_steps is not None:
            fields["max_warmup_steps"] = max_warmup_steps
        refresh_context(pipe, **fields)
        if seed_state is not None:
            generator.set_state(seed_state)
        started = time.perf_counter()
        output = pipe(**call_kwargs)
        seconds = time.perf_counter() - started
        images = images_01(output)
        if not reference:
            reference.append(images)
        cached, calls, speedup = blocks_speedup(summary(pipe, logging=False))
        trial = Trial(threshold, cached, calls, speedup, seconds, psnr(reference[0], images, data_range=1.0),
                      None if score is None else float(score(output)))
        trials.append(trial)
        if progress and threshold > 0:
            _progress(len(trials) - 1, max_trials, trial, score_name, stream)
        return trial

    run(0.0)  # compiles on a first call; the reference
    graphs_before = sum(len(h.graphs) for h in handles)
    chosen, reached, message = _search(run, target_speedup, min_psnr, max_trials, max_threshold, tolerance)
    graphs_compiled = sum(len(h.graphs) for h in handles) - graphs_before
    refresh_context(pipe, residual_diff_threshold=chosen.threshold if apply and chosen is not None else before)
    if seed_state is not None:
        generator.set_state(seed_state)
    result = TuneResult(sorted(trials, key=lambda t: t.threshold), chosen, reached, message, graphs_compiled,
                        score_name, {"target_speedup": target_speedup, "min_psnr": min_psnr})
    if plot:
        result.plot(plot)
    return result


def _search(run, target_speedup, min_psnr, max_trials, max_threshold, tolerance):
    """(chosen trial, reached, message) after at most ``max_trials`` calls of ``run(threshold)``."""
    if target_speedup is None and min_psnr is None:
        sweep = [t for t in SWEEP if t <= max_threshold][:max_trials]
        for threshold in sweep:
            run(threshold)
        return None, True, f"swept {len(sweep)} thresholds (no target given)"
    keeps_psnr = (lambda t: min_psnr is None or t.psnr >= min_psnr)
    top = run(max_threshold)
    lo, hi = 0.0, max_threshold
    if target_speedup is not None:
        if top.speedup < target_speedup - tolerance:
            return top if keeps_psnr(top) else None, False, (
                f"cannot reach {target_speedup:.2f}x: threshold {max_threshold:g} (the largest tried) gives "
                f"{top.speedup:.2f}x ({top.cached}/{top.calls} calls cached)")
        best = top
        for _ in range(max_trials - 1):
            if abs(best.speedup - target_speedup) <= tolerance:
                break
            trial = run((lo + hi) / 2)
            if trial.speedup < target_speedup:
                lo = trial.threshold
            else:
                hi = trial.threshold
            if abs(trial.speedup - target_speedup) < abs(best.speedup - target_speedup):
                best = trial
        if abs(best.speedup - target_speedup) > tolerance:
            return best, False, (f"cannot reach {target_speedup:.2f}x within {tolerance:g} in {max_trials} trials: "
                                 f"the closest is {best.speedup:.2f}x at threshold {best.threshold:.4g} (cached "
                                 "calls change in steps; try more trials or another max_warmup_steps)")
        if not keeps_psnr(best):
            return best, False, (f"{best.speedup:.2f}x at threshold {best.threshold:.4g} gives PSNR {best.psnr:.2f} dB, "
                                 f"under min_psnr {min_psnr:g}: the target speedup costs more fidelity than allowed")
        return best, True, f"{best.speedup:.2f}x at threshold {best.threshold:.4g}"
    if keeps_psnr(top):
        return top, True, f"threshold {max_threshold:g} (the largest tried) keeps PSNR {top.psnr:.2f} dB"
    best = None
    for _ in range(max_trials - 1):
        trial = run((lo + hi) / 2)
        if keeps_psnr(trial):
            lo, best = trial.threshold, trial
        else:
            hi = trial.threshold
    if best is None:
        return None, False, f"no tried threshold > 0 keeps PSNR >= {min_psnr:g} dB (the smallest tried: {hi:.4g})"
    return best, True, f"threshold {best.threshold:.4g} keeps PSNR {best.psnr:.2f} dB at {best.speedup:.2f}x"
