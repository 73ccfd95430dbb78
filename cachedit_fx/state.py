"""Cache state of one block chain as device tensors, and the pure functions that update it.

Everything here is tensor arithmetic: no ``.item()``, no ``bool(tensor)``, no Python branching on
tensor values, so the rewritten graph (and ``torch.compile(fullgraph=True)``) can call it. The writes
into the caller-owned state tensors happen in :mod:`cachedit_fx.step`, outside the ``torch.cond``.
The semantics are those of ``docs/algorithm.md``.

Shapes: ``nb`` CFG branches (1, or 2 with separate CFG), ``S`` decision slots (1, or the batch size
in per-sample mode), ``CAP`` logged steps.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import DBCacheConfig, TaylorSeerCalibratorConfig

LOG_CAPACITY = 1024

# Which gate of docs/algorithm.md settled a step (gate_log values; 0 = no call at that step).
GATE_NAMES = {
    1: "warmup", 2: "steps_mask", 3: "max_cached_steps", 4: "max_continuous_cached_steps",
    5: "max_accumulated_diff", 6: "threshold<=0", 7: "no_reference", 8: "threshold>=1", 9: "diff_test",
}
PARAM_NAMES = ("threshold", "warmup", "interval", "max_cached", "max_continuous", "max_accumulated",
               "has_mask", "static_mask", "n_steps", "refresh_hint", "refresh_repeat")
TAYLOR_START = 3  # the first step at which a computed step may add a derivative to its ladder
# A call whose timestep moves on by over twice the last step and whose latent changes by more than this
# (relative L1; a denoising step changes it by 0.1-0.35, a fresh noise sample by about 1.4) starts a request.
LATENT_JUMP = 0.5


class BranchBy(str, enum.Enum):
    """With two CFG branches and no caller hint, which branch a call belongs to."""

    PARITY = "parity"  # calls alternate
    TIMESTEP = "timestep"  # a call whose timestep equals the previous call's is a CFG pair's second call


@dataclass(frozen=True)
class StreamSpec:
    """One value the middle segment produces (a carry into Bn): its shape, dtype and ladder length."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ladder: int  # TaylorSeer order + 1; 1 = plain DBCache (reuse the last residual)
    absolute: bool = False  # calibrator_cache_type="hidden_states": forecast the value, not its residual


class Clear(str, enum.Enum):
    """What clears a state tensor on device (``ChainState.reset`` clears every one with an initial value)."""

    NEVER = "never"
    REQUEST = "request"  # a new request
    CONTEXT = "context"  # a new request, or a forced refresh (force_refresh_step_hint) within one


@dataclass(frozen=True)
class StateField:
    """One state tensor: its shape and dtype, the value :meth:`ChainState.reset` gives it (None: loaded
    by :meth:`ChainState.configure`), and what clears it on device."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    initial: float | None
    clear: Clear


@dataclass(frozen=True)
class ChainLayout:
    """The static (compile-time) facts of one chain's state; numbers that may change between
    requests (threshold, warmup, masks ...) live in the ``params``/``mask`` tensors instead."""

    n_branches: int
    slots: int
    fn_shape: tuple[int, ...]
    fn_dtype: torch.dtype
    streams: tuple[StreamSpec, ...]
    diff_shared: bool = False  # cfg_diff_compute_separate=False: the 2nd call of a step reuses the 1st's diff
    branch_by: BranchBy = BranchBy.PARITY
    capacity: int = LOG_CAPACITY
    latent_shape: tuple[int, ...] | None = None  # the latent input's, kept to tell requests apart (None: none)
    latent_dtype: torch.dtype = torch.float32
    # The process group the sequence is sharded over (context parallelism), by name: diffs, latent
    # changes, finiteness and the decision are reduced over it so every rank decides alike. None: one process.
    group: str | None = None

    def fields(self) -> list[StateField]:
        """The state table, in the order the graph takes the tensors. Reference and ladders keep their
        values when cleared on device: ``has_ref`` / ``ladder_len`` say they are stale."""
        nb, s, cap, f64, i64 = self.n_branches, self.slots, self.capacity, torch.float64, torch.int64
        never, request, context = Clear.NEVER, Clear.REQUEST, Clear.CONTEXT
        table = [
            # name           shape                 dtype          reset()    cleared on device by
            ("params",       (len(PARAM_NAMES),),  f64,           None,      never),
            ("mask",         (cap,),               torch.int8,    None,      never),
            ("last_t",       (1,),                 f64,           -math.inf, never),
            ("t_dir",        (1,),                 f64,           0.0,       never),
            ("branch_hint",  (1,),                 i64,           -1,        never),
            ("last_dt",      (1,),                 f64,           0.0,       never),
            ("prev_latent",  self.latent_shape or (0,), self.latent_dtype, 0.0, never),
            ("latent_seen",  (1,),                 torch.bool,    False,     never),
            ("refreshes",    (1,),                 i64,           0,         request),
            ("calls_total",  (1,),                 i64,           0,         context),
            ("calls",        (nb,),                i64,           0,         context),
            ("cached_count", (nb, s),              i64,           0,         context),
            ("run",          (nb, s),              i64,           0,         context),
            ("ladder_len",   (nb, s),              i64,           0,         context),
            ("last_computed", (nb, s),             i64,           0,         context),
            ("has_ref",      (nb, s),              torch.bool,    False,     context),
            ("acc_diff",     (nb, s),              f64,           0.0,       context),
            ("shared_diff",  (s,),                 torch.float32, math.nan,  context),
            ("diff_log",     (nb, cap, s),         torch.float32, math.nan,  context),
            ("gate_log",     (nb, cap, s),         torch.int8,    0,         context),
            ("cached_log",   (nb, cap, s),         torch.bool,    False,     context),
            ("ref",          (nb, *self.fn_shape), self.fn_dtype, 0.0,       never),
        ]
        table += [(f"ladder_{k}", (nb, st.ladder, *st.shape), st.dtype, 0.0, never)
                  for k, st in enumerate(self.streams)]
        return [StateField(*row) for row in table]

    @property
    def ladder(self) -> int:
        """The longest ladder of the chain's streams (``ladder_len`` counts up to it)."""
        return max([1, *(st.ladder for st in self.streams)])

    def names(self) -> list[str]:
        return [f.name for f in self.fields()]

    def stored_names(self) -> list[str]:
        """The activation-sized state a computed step stores and a cached one reads: the reference,
        then one ladder per stream (the order of :class:`~cachedit_fx.step.BranchOut`'s rows)."""
        return ["ref", *(f"ladder_{k}" for k in range(len(self.streams)))]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {f.name: (f.shape, f.dtype) for f in self.fields()}

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, JSON-able (export metadata)."""
        out = dataclasses.asdict(self)
        out["fn_shape"], out["fn_dtype"] = list(self.fn_shape), _dtype_name(self.fn_dtype)
        out["latent_shape"] = None if self.latent_shape is None else list(self.latent_shape)
        out["latent_dtype"] = _dtype_name(self.latent_dtype)
        out["streams"] = [{"shape": list(s.shape), "dtype": _dtype_name(s.dtype), "ladder": s.ladder,
                           "absolute": s.absolute} for s in self.streams]
        out["branch_by"] = self.branch_by.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChainLayout":
        streams = tuple(StreamSpec(tuple(s["shape"]), _dtype(s["dtype"]), s["ladder"], s["absolute"])
                        for s in d["streams"])
        latent = None if d["latent_shape"] is None else tuple(d["latent_shape"])
        return cls(**{**d, "fn_shape": tuple(d["fn_shape"]), "fn_dtype": _dtype(d["fn_dtype"]), "streams": streams,
                      "branch_by": BranchBy(d["branch_by"]), "latent_shape": latent,
                      "latent_dtype": _dtype(d["latent_dtype"])})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


@dataclass(frozen=True)
class ChainAbout:
    """What a cached chain is, for statistics and reports: its lists, pattern, length and Fn / Bn."""

    name: str
    pattern: str
    n_blocks: int
    fn: int
    bn: int


def stream_spec(shape: tuple[int, ...], dtype: torch.dtype, calib: TaylorSeerCalibratorConfig | None,
                role: str) -> StreamSpec:
    """How a middle output of stream ``role`` ("H" / "E") is cached: H follows ``enable_calibrator``, E
    ``enable_encoder_calibrator``; a calibrated stream keeps ``taylorseer_order + 1`` ladder entries of
    its residual (or, with ``calibrator_cache_type="hidden_states"``, of the value itself)."""
    on = calib is not None and (calib.enable_calibrator if role == "H" else calib.enable_encoder_calibrator)
    if not on:
        return StreamSpec(shape, dtype, 1)
    return StreamSpec(shape, dtype, calib.taylorseer_order + 1, calib.calibrator_cache_type == "hidden_states")


def diff_shared(cache: DBCacheConfig, n_branches: int) -> bool:
    """The second CFG call of a step reuses the first's diff (``cfg_diff_compute_separate=False``), as
    cache-dit does only when the non-CFG call comes first (``cfg_compute_first=False``)."""
    return n_branches == 2 and not cache.cfg_diff_compute_separate and not cache.cfg_compute_first


def params_from_config(cfg: DBCacheConfig) -> tuple[list[float], list[int]]:
    acc = cfg.max_accumulated_residual_diff_threshold
    mask = list(cfg.steps_computation_mask or [])[:LOG_CAPACITY]
    warmup = cfg.max_warmup_steps
    if mask:  # a mask's leading computed steps bound the warmup
        warmup = min(warmup, next((i for i, bit in enumerate(mask) if bit == 0), len(mask)))
    params = [cfg.residual_diff_threshold, warmup, cfg.warmup_interval, cfg.max_cached_steps,
              cfg.max_continuous_cached_steps, 0.0 if acc is None else acc, float(bool(mask)),
              float(cfg.steps_computation_policy == "static"), cfg.num_inference_steps or 0,
              cfg.force_refresh_step_hint or 0, float(cfg.force_refresh_step_policy == "repeat")]
    return params, mask + [0] * (LOG_CAPACITY - len(mask))


class ChainState:
    """Caller-owned state tensors of one chain; the compiled graph mutates them in place."""

    def __init__(self, layout: ChainLayout, cache_config: DBCacheConfig, device=None):
        self.layout = layout
        self.tensors = {f.name: torch.empty(f.shape, dtype=f.dtype, device=device) for f in layout.fields()}
        self.configure(cache_config)
        self.reset()

    def configure(self, cache_config: DBCacheConfig) -> None:
        """Load the request-level numbers (threshold, warmup, mask ...) without touching the graph."""
        params, mask = params_from_config(cache_config)
        self.tensors["params"].copy_(torch.tensor(params, dtype=torch.float64))
        self.tensors["mask"].copy_(torch.tensor(mask, dtype=torch.int8))

    def reset(self) -> None:
        for f in self.layout.fields():
            if f.initial is not None:
                self.tensors[f.name].fill_(f.initial)

    def ordered(self) -> list[torch.Tensor]:
        return [self.tensors[n] for n in self.layout.names()]


# ----------------------------------------------------------------------------- pure functions


def across_ranks(x: torch.Tensor, group: str | None, op: str = "sum") -> torch.Tensor:
    """``x`` reduced over the ranks of ``group`` (a traceable functional collective, so it stays inside
    the graph); ``x`` itself without a group."""
    if group is None:
        return x
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, op, group))


def relative_l1(prev: torch.Tensor, cur: torch.Tensor, slots: int, group: str | None = None) -> torch.Tensor:
    """mean|prev - cur| / mean|prev| in the residuals' own dtype, over everything (slots=1) or per batch
    element; returned as float32, shape (slots,). With a ``group`` the tensors are shards of the
    sequence: the sums of every rank's shard make the ratio (the one of the whole sequence)."""
    p, c = prev.reshape(slots, -1), cur.reshape(slots, -1)
    if group is None:
        return ((p - c).abs().mean(dim=1) / p.abs().mean(dim=1)).float()
    sums = across_ranks(torch.stack([(p - c).abs().float().sum(dim=1), p.abs().float().sum(dim=1)]), group)
    return sums[0] / sums[1]


def decide(step, diff, has_ref, cached_count, run, acc_diff, params, mask):
    """docs/algorithm.md's gates 1–9, first that fires wins. Returns (use_cache, gate, recorded_diff), each (S,).

    ``step`` is a 0-dim int tensor; ``diff`` the relative L1 of the Fn residual (S,), possibly NaN.
    ``recorded_diff`` is the diff the step records (gates 8/9), NaN where an earlier gate fired.
    """
    thr, warmup, interval, max_cached, max_cont, max_acc, has_mask, static = params.unbind(0)[:8]
    stepf = step.to(torch.float64)
    in_mask = step < mask.shape[0]
    # index_select, not mask[step]: indexing with a 0-dim tensor calls __index__ (a host read)
    bit = mask.index_select(0, step.clamp(0, mask.shape[0] - 1).reshape(1)).reshape(())
    mask_bit = torch.where(in_mask, bit, torch.zeros_like(bit)) == 1
    fired = [  # (condition, use_cache when it fires)
        ((stepf < warmup) & (torch.remainder(stepf, interval) == 0), False),
        ((has_mask > 0) & mask_bit, False),
        ((has_mask > 0) & ~mask_bit & (static > 0), True),
        ((max_cached >= 0) & (cached_count.double() >= max_cached), False),
        ((max_cont >= 0) & (run.double() >= max_cont), False),
        ((max_acc > 0) & (acc_diff >= max_acc), False),
        (thr <= 0, False),
        (~has_ref, False),
        (thr >= 1, True),
    ]
    gate_ids = [1, 2, 2, 3, 4, 5, 6, 7, 8]
    slots = diff.shape[0]
    finite = torch.isfinite(diff)
    use_cache = finite & (diff.double() < thr)
    gate = torch.full((slots,), 9, dtype=torch.int8, device=diff.device)
    recorded = torch.where(thr >= 1, torch.full_like(diff, -1.0), diff)
    settled_early = torch.zeros(slots, dtype=torch.bool, device=diff.device)
    for (cond, value), gid in reversed(list(zip(fired, gate_ids))):
        cond = cond.expand(slots)
        use_cache = torch.where(cond, torch.full_like(use_cache, value), use_cache)
        gate = torch.where(cond, torch.full_like(gate, gid), gate)
        if gid < 8:
            settled_early = settled_early | cond
    recorded = torch.where(settled_early, torch.full_like(diff, math.nan), recorded)
    return use_cache, gate, recorded


def taylor_update(ladder, ladder_len, value, window, step):
    """New derivative ladder after a computed step: d0 = value, d[i+1] = (d[i] - d_prev[i]) / window.

    ``ladder`` (K, *shape); ``ladder_len`` (S,) valid entries before this step; ``window`` (S,) steps
    since the previous computed step. A derivative exists only where its previous entry did and from
    step ``TAYLOR_START`` on (cache-dit's rule); the others become 0 (``next_ladder_len`` says so).
    """
    new = [value]
    w = slot_view(window.to(value.dtype), value)
    late = step >= TAYLOR_START
    for i in range(ladder.shape[0] - 1):
        d = (new[i] - ladder[i]) / w
        new.append(torch.where(slot_view((ladder_len > i) & late, value), d, torch.zeros_like(d)))
    return torch.stack(new)


def next_ladder_len(ladder_len, step, longest: int):
    """Valid ladder entries after a computed step: one more (up to ``longest``) from ``TAYLOR_START`` on,
    else the value alone."""
    return torch.where(step >= TAYLOR_START, (ladder_len + 1).clamp(max=longest), torch.ones_like(ladder_len))


def taylor_approx(ladder, ladder_len, distance):
    """Forecast sum_i d[i] * distance^i / i! over the valid entries; plain reuse when K == 1."""
    out = ladder[0]
    dist = slot_view(distance.to(ladder.dtype), out)
    for i in range(1, ladder.shape[0]):
        term = ladder[i] * dist.pow(i) / math.factorial(i)
        out = out + torch.where(slot_view(ladder_len > i, out), term, torch.zeros_like(term))
    return out


def all_finite(xs, slots: int, group: str | None = None) -> torch.Tensor:
    """(S,) whether every value of each slot of every tensor in ``xs`` is finite (on every rank)."""
    bad = sum((~torch.isfinite(x.reshape(slots, -1))).sum(dim=1) for x in xs)
    return across_ranks(bad, group) == 0


def commit(use_cache, finite, step, recorded_diff, longest, cached_count, run, ladder_len, last_computed, has_ref,
           acc_diff):
    """Counter updates after a step (S,) each: cached steps count and extend the run, computed steps
    reset it, grow the ladder and become the new reference point; positive recorded diffs (+inf too,
    NaN not) accumulate. A computed step whose residuals are not ``finite`` leaves no reference and an
    empty ladder: the next step computes afresh."""
    computed = ~use_cache
    kept = computed & finite
    return dict(
        cached_count=cached_count + use_cache.long(),
        run=torch.where(use_cache, run + 1, torch.zeros_like(run)),
        ladder_len=torch.where(kept, next_ladder_len(ladder_len, step, longest),
                               torch.where(computed, torch.zeros_like(ladder_len), ladder_len)),
        last_computed=torch.where(computed, step.expand_as(last_computed), last_computed),
        has_ref=torch.where(computed, finite, has_ref),
        acc_diff=acc_diff + torch.where(recorded_diff > 0, recorded_diff.double(), torch.zeros_like(acc_diff)),
    )


def slot_view(per_slot, like):
    """(S,) -> (S, 1, 1, ...) so it broadcasts over a batch-first tensor (S == 1 or S == batch)."""
    return per_slot.reshape(per_slot.shape[0], *([1] * (like.dim() - 1)))
