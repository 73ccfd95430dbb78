"""Per-chain, per-CFG-branch statistics read from the device logs after a run (one transfer each)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MissingDependency
from .handle import CacheHandle
from .state import GATE_NAMES


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

    @property
    def cached_steps(self) -> int:
        return int(sum(self.cached))

    def diff_percentiles(self) -> dict[str, float]:
        d = np.array([x for x in self.diffs if np.isfinite(x) and x >= 0])
        if d.size == 0:
            return {}
        return {"min": float(d.min()), "P25": float(np.percentile(d, 25)), "P50": float(np.percentile(d, 50)),
                "P75": float(np.percentile(d, 75)), "P95": float(np.percentile(d, 95)), "max": float(d.max())}


def collect(handle: CacheHandle) -> list[ChainStats]:
    out = []
    for chain in handle.chains:
        t = {k: chain.state.tensors[k].detach().cpu() for k in ("calls", "gate_log", "cached_log", "diff_log")}
        called = [min(int(t["calls"][b]), chain.layout.capacity) for b in range(chain.layout.n_branches)]
        for b, steps in enumerate(called):
            if steps == 0 and (b > 0 or any(called)):
                # A CFG branch the pipeline never called on this graph: guidance off, or the cond and
                # uncond calls compiled to graphs of their own (different text lengths).
                continue
            slot_cached = t["cached_log"][b, :steps]
            out.append(ChainStats(
                chain=chain.info.name, pattern=chain.info.pattern, n_blocks=chain.info.n_blocks,
                fn=chain.split.fn, bn=chain.split.bn, branch=b, steps=steps,
                cached=[bool(x) for x in slot_cached.all(dim=1)],
                diffs=[float(x) for x in t["diff_log"][b, :steps].nanmean(dim=1)] if steps else [],
                gates=[GATE_NAMES.get(int(g), "-") for g in t["gate_log"][b, :steps, 0]],
            ))
    return out


def plot_diffs(stats: list[ChainStats], threshold: float, path: str) -> str:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("the diff plot is drawn with matplotlib, which is not installed: "
                                "pip install 'cachedit-fx[cli]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
