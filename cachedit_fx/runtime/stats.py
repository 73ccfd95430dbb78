"""Statistics read from the device logs after a run (one transfer each): per chain and CFG branch
(:class:`ChainStats`), and cache-dit's :class:`~cachedit_fx.compat.stats.CacheStats` that ``summary()``
returns; their table and the per-step diff plot."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..compat.stats import CacheStats
from ..errors import MissingDependency
from .algorithm import GATE_NAMES
from .handle import CacheHandle
from .prune_layout import PruneLayout


@dataclass
class ChainStats:
    chain: str
    pattern: str
    n_blocks: int
    fn: int
    bn: int
    branch: int
    steps: int
    cached: list[bool]
    diffs: list[float]
    gates: list[str]
    ratios: list[float] = field(default_factory=list)  # MagCache calibration's, per step

    @property
    def n_cached(self) -> int:
        return int(sum(self.cached))

    def diff_percentiles(self) -> dict[str, float]:
        return diff_percentiles(self.diffs)


def diff_percentiles(diffs) -> dict[str, float]:
    d = np.array([x for x in diffs if np.isfinite(x) and x >= 0])
    if d.size == 0:
        return {}
    return {"min": float(d.min()), "P25": float(np.percentile(d, 25)), "P50": float(np.percentile(d, 50)),
            "P75": float(np.percentile(d, 75)), "P95": float(np.percentile(d, 95)), "max": float(d.max())}


def _branch_fields(s: ChainStats | None) -> tuple[list[int], dict[str, float], list[str]]:
    if s is None:
        return [], {}, []
    diffs = {str(i): d for i, d in enumerate(s.diffs) if not math.isnan(d)}
    return [i for i, c in enumerate(s.cached) if c], diffs, s.gates


def cache_stats(handle: CacheHandle, transformer: str, only=None) -> list[CacheStats]:
    """One :class:`CacheStats` per compiled chain of ``handle`` (and per graph compiled uncached), of
    the graphs in ``only`` where given (:func:`~.handle.last_request`'s)."""
    options = {"cache_config": handle.cache_config, "calibrator_config": handle.calibrator_config}
    graphs = [g for g in handle.graphs if only is None or any(g is o for o in only)]
    out = [CacheStats(cache_options=options, transformer=transformer, unmatched=g.unmatched)
           for g in graphs if g.unmatched]
    cfg_branch = 0 if handle.cache_config.cfg_compute_first else 1  # the CFG (uncond) call's state set
    for chain in (c for g in graphs for c in g.chains):
        if isinstance(chain.layout, PruneLayout):
            out.append(_prune_cache_stats(chain, cfg_branch, options, transformer))
            continue
        by_branch = {s.branch: s for s in _chain_stats(chain)}
        cached, diffs, gates = _branch_fields(by_branch.get(1 - cfg_branch))
        cfg_cached, cfg_diffs, cfg_gates = _branch_fields(by_branch.get(cfg_branch))
        ratios, cfg_ratios = (by_branch[b].ratios if b in by_branch else [] for b in (1 - cfg_branch, cfg_branch))
        out.append(CacheStats(
            cache_options=options, cached_steps=cached, residual_diffs=diffs, cfg_cached_steps=cfg_cached,
            cfg_residual_diffs=cfg_diffs, accumulated_cached_steps=len(cached),
            cfg_accumulated_cached_steps=len(cfg_cached), accumulated_executed_steps=max(len(gates), len(cfg_gates)),
            accumulated_transformer_executed_steps=len(gates) + len(cfg_gates), transformer=transformer,
            chain=chain.about.name, pattern=chain.about.pattern, n_blocks=chain.about.n_blocks, Fn=chain.about.fn,
            Bn=chain.about.bn,
            gates=gates, cfg_gates=cfg_gates, mag_ratios=ratios, cfg_mag_ratios=cfg_ratios))
    return out


def _prune_logs(chain) -> list[dict]:
    """Per CFG branch that ran: its steps' pruned block counts, each block's recorded diff and gate."""
    t = {k: chain.state.tensors[k].detach().cpu() for k in ("calls", "pruned_log", "block_diff_log", "block_gate_log")}
    called = [min(int(t["calls"][b]), chain.layout.capacity) for b in range(chain.layout.n_branches)]
    out = []
    for b, steps in enumerate(called):
        gates = t["block_gate_log"][b, :steps].tolist()
        recorded = [[float(d) for d, g in zip(row, gate) if g >= 8] for row, gate in
                    zip(t["block_diff_log"][b, :steps].tolist(), gates)]
        out.append(dict(steps=steps, pruned=[int(n) for n in t["pruned_log"][b, :steps]], recorded=recorded,
                        gates=["/".join(dict.fromkeys(GATE_NAMES.get(g, "-") for g in row)) for row in gates]))
    return out


def _prune_cache_stats(chain, cfg_branch: int, options: dict, transformer: str) -> CacheStats:
    """cache-dit's DBPrune statistics of one chain: a step is cached (pruned) when a block was pruned in it;
    ``residual_diffs`` maps a step to the diffs its blocks recorded."""
    logs = _prune_logs(chain)
    empty = dict(steps=0, pruned=[], recorded=[], gates=[])
    branch, cfg = logs[1 - cfg_branch] if len(logs) > 1 else logs[0], logs[cfg_branch] if len(logs) > 1 else empty
    fields = {}
    for prefix, log in (("", branch), ("cfg_", cfg)):
        actual = [chain.layout.n_blocks] * log["steps"]
        fields.update({
            f"{prefix}cached_steps": [i for i, n in enumerate(log["pruned"]) if n > 0],
            f"{prefix}residual_diffs": {str(i): d for i, d in enumerate(log["recorded"]) if d},
            f"{prefix}pruned_blocks": log["pruned"], f"{prefix}actual_blocks": actual,
            f"{prefix}pruned_ratio": sum(log["pruned"]) / sum(actual) if log["steps"] else None,
            f"{prefix}gates": log["gates"]})
    about = chain.about
    return CacheStats(
        cache_options=options, **fields, pruned_steps=fields["cached_steps"], cfg_pruned_steps=fields["cfg_cached_steps"],
        accumulated_cached_steps=len(fields["cached_steps"]), cfg_accumulated_cached_steps=len(fields["cfg_cached_steps"]),
        accumulated_executed_steps=max(branch["steps"], cfg["steps"]),
        accumulated_transformer_executed_steps=branch["steps"] + cfg["steps"], transformer=transformer,
        chain=about.name, pattern=about.pattern, n_blocks=about.n_blocks, Fn=about.fn, Bn=about.bn)


def render_stats(stats: list[CacheStats], details: bool = False) -> str:
    lines = []
    for s in stats:
        if s.unmatched:
            lines.append(f"{s.transformer}: uncached graph ({s.unmatched})")
            continue
        for label, cached, diffs, steps in (("", s.cached_steps, s.residual_diffs, s.steps),
                                            ("CFG ", s.cfg_cached_steps, s.cfg_residual_diffs, s.cfg_steps)):
            if steps == 0 and label:
                continue
            flat = [d for v in diffs.values() for d in (v if isinstance(v, list) else [v])]  # DBPrune: lists
            p = ", ".join(f"{k}={v:.3f}" for k, v in diff_percentiles(flat).items())
            pruned = s.cfg_pruned_blocks if label else s.pruned_blocks
            blocks = f"; pruned {sum(pruned)}/{s.n_blocks * steps} blocks" if s.pruned_steps or s.pruned_blocks else ""
            lines.append(f"{s.transformer} {s.chain} pattern {s.pattern} F{s.Fn}B{s.Bn}: {label}cached "
                         f"{len(cached)}/{steps} steps{blocks}; diff {p or '-'}")
            ratios = s.cfg_mag_ratios if label else s.mag_ratios
            if ratios:
                lines.append(f"  {label}MagCache ratios (MagCacheConfig(mag_ratios=...)): {[round(r, 5) for r in ratios]}")
            if details:
                lines.append(f"  {label}cached steps: {cached}")
                lines.append(f"  {label}residual diffs: " + ", ".join(
                    f"{k}: {v:.4f}" if not isinstance(v, list) else f"{k}: [{', '.join(f'{d:.4f}' for d in v)}]"
                    for k, v in diffs.items()))
    return "\n".join(lines)


def collect(handle: CacheHandle) -> list[ChainStats]:
    return [s for chain in handle.chains for s in _chain_stats(chain)]


def _chain_stats(chain) -> list[ChainStats]:
    if isinstance(chain.layout, PruneLayout):  # a step is cached when a block was pruned in it
        about = chain.about
        return [ChainStats(about.name, about.pattern, about.n_blocks, about.fn, about.bn, b, log["steps"],
                           [n > 0 for n in log["pruned"]], [float(np.mean(d)) if d else math.nan for d in log["recorded"]],
                           log["gates"]) for b, log in enumerate(_prune_logs(chain)) if log["steps"] or b == 0]
    t = {k: chain.state.tensors[k].detach().cpu() for k in ("calls", "gate_log", "cached_log", "diff_log", "ratio_log")
         if k in chain.state.tensors}
    called = [min(int(t["calls"][b]), chain.layout.capacity) for b in range(chain.layout.n_branches)]
    out = []
    for b, steps in enumerate(called):
        if steps == 0 and (b > 0 or any(called)):
            # A CFG branch the pipeline never called on this graph: guidance off, or the cond and
            # uncond calls compiled to graphs of their own (different text lengths).
            continue
        out.append(ChainStats(
            chain=chain.about.name, pattern=chain.about.pattern, n_blocks=chain.about.n_blocks,
            fn=chain.about.fn, bn=chain.about.bn, branch=b, steps=steps,
            cached=[bool(x) for x in t["cached_log"][b, :steps].all(dim=1)],
            diffs=[float(x) for x in t["diff_log"][b, :steps].nanmean(dim=1)] if steps else [],
            gates=[GATE_NAMES.get(int(g), "-") for g in t["gate_log"][b, :steps, 0]],
            ratios=[float(x) for x in t["ratio_log"][b, :steps].mean(dim=1)] if "ratio_log" in t else [],
        ))
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend, or MissingDependency naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("plots are drawn with matplotlib, which is not installed: "
                                "pip install 'cachedit-fx[cli]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_diffs(ax, stats: list[ChainStats], threshold: float) -> None:
    """The per-step diffs of ``stats`` on a matplotlib axis: one line per chain and branch, cached steps
    circled, the threshold dashed."""
    for s in stats:
        steps = np.arange(s.steps)
        diffs = np.array(s.diffs, dtype=float)
        ax.plot(steps, diffs, marker=".", label=f"{s.chain} branch {s.branch}")
        cached = np.array(s.cached, dtype=bool)
        ax.scatter(steps[cached], diffs[cached], marker="o", facecolors="none", edgecolors="k", s=60)
    ax.axhline(threshold, color="r", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L1 diff of Fn residual")
    ax.set_title("cachedit-fx: per-step diff (circles = cached steps)")
    ax.legend(fontsize=7)


def plot_diffs(stats: list[ChainStats], threshold: float, path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    draw_diffs(ax, stats, threshold)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
