"""The static layout of one block chain's cache state: the state table (:meth:`ChainLayout.fields`),
the streams the middle produces and how they are forecast, the request-level numbers (``params``)
by name, and how calls map to CFG branches. Built once per chain by :func:`chain_layout`, for the
graph path and the eager cache alike.

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

from ..config import CalibratorConfig, DBCacheConfig, DMDCalibratorConfig, SeparateCFG, indicator_of
from ..errors import ConfigError

LOG_CAPACITY = 1024

PARAM_NAMES = ("threshold", "warmup", "interval", "max_cached", "max_continuous", "max_accumulated",
               "has_mask", "static_mask", "n_steps", "refresh_hint", "refresh_repeat")
PARAM_INDEX = {name: i for i, name in enumerate(PARAM_NAMES)}
# MagCache's request-level numbers (its own small tensor, present in MagCache layouts only)
MAG_PARAM_NAMES = ("retention", "max_skip", "n_ratios")


def param(params: torch.Tensor, name: str) -> torch.Tensor:
    """The request-level number ``name`` of a ``params`` state tensor, as a (1,) view."""
    i = PARAM_INDEX[name]
    return params[i:i + 1]


def named_params(params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every request-level number of a ``params`` state tensor by name, each 0-dim."""
    return dict(zip(PARAM_NAMES, params.unbind(0)))


class BranchBy(str, enum.Enum):
    """With two CFG branches and no caller hint, which branch a call belongs to."""

    PARITY = "parity"  # calls alternate
    TIMESTEP = "timestep"  # a call whose timestep equals the previous call's is a CFG pair's second call


@dataclass(frozen=True)
class StreamSpec:
    """One value the middle segment produces (a carry into Bn): its shape, dtype, role ("H" / "E"), how
    a cached step forecasts it and how many activation-sized entries its history (``ladder_k``) holds."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ladder: int  # history entries: TaylorSeer order + 1 (1 = plain DBCache, reuse), FoCa 4, DMD H + 2(n + 1)
    absolute: bool = False  # calibrator_cache_type="hidden_states": forecast the value, not its residual
    calibrator: str = "taylorseer"  # "taylorseer" (ladder 1: reuse) | "foca" | "dmd"
    role: str = "H"


@dataclass(frozen=True)
class CalibratorSpec:
    """The chain's calibrator, as compiled in: its kind and DMD's numbers. ``order``: TaylorSeer's order,
    or the order of DMD's Taylor fallback (0: no calibrator, every stream reuses)."""

    kind: str = "taylorseer"  # "taylorseer" | "foca" | "dmd"
    order: int = 0
    history: int = 0  # DMD's snapshots
    rank: int = 0  # DMD's truncation rank (0: from the spectrum)
    ridge: float = 1e-8

    def entries(self) -> int:
        """A calibrated stream's history entries (see :class:`StreamSpec`)."""
        return {"taylorseer": self.order + 1, "foca": 4, "dmd": self.history + 2 * (self.order + 1)}[self.kind]

    def longest(self) -> int:
        """The largest ``ladder_len``: TaylorSeer's valid derivatives, FoCa's computed values (2), DMD's
        valid fallback derivatives."""
        return 2 if self.kind == "foca" else self.order + 1


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
    calibrator: CalibratorSpec = CalibratorSpec()
    indicator: str = "dbcache"  # when to cache: "dbcache" | "first_block" | "magcache" (config/indicators.py)
    records_ratios: bool = False  # MagCache's calibration run: log the H residual's magnitude ratio per step

    def fields(self) -> list[StateField]:
        """The state table, in the order the graph takes the tensors. Reference and ladders keep their
        values when cleared on device: ``has_ref`` / ``ladder_len`` say they are stale."""
        nb, s, cap, f64, i64 = self.n_branches, self.slots, self.capacity, torch.float64, torch.int64
        never, context = Clear.NEVER, Clear.CONTEXT
        table = request_rows(self) + [
            # name           shape                 dtype          reset()    cleared on device by
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
        if self.calibrator.kind == "dmd":  # the fallback ladder before the last one, the snapshots' steps
            table += [("prev_ladder_len", (nb, s), i64, 0, context),
                      ("dmd_steps", (nb, s, self.calibrator.history), i64, -1, context)]
        if self.indicator == "magcache":
            f32 = torch.float32
            table += [("mag_params", (len(MAG_PARAM_NAMES),), f64, None, never),
                      ("mag_ratios", (cap,), f32, None, never),
                      ("mag_acc_ratio", (nb, s), f32, 1.0, context),
                      ("mag_acc_err", (nb, s), f32, 0.0, context),
                      ("mag_acc_steps", (nb, s), i64, 0, context)]
        if self.records_ratios:
            table.append(("ratio_log", (nb, cap, s), torch.float32, math.nan, context))
        return [StateField(*row) for row in table]

    def configured(self, cache_config: DBCacheConfig) -> dict[str, list]:
        """The values of the fields a config loads (``initial`` None): the request-level numbers (and
        MagCache's ratios)."""
        params, mask = params_from_config(cache_config)
        out = {"params": params, "mask": mask}
        if self.indicator == "magcache":
            steps = cache_config.num_inference_steps or 1
            ratios = cache_config.resampled_ratios(steps)[:LOG_CAPACITY] if cache_config.mag_ratios is not None else []
            retention = int(cache_config.retention_ratio * steps + 0.5)
            out["mag_params"] = [float(retention), float(cache_config.max_skip_steps), float(len(ratios))]
            out["mag_ratios"] = ratios + [1.0] * (LOG_CAPACITY - len(ratios))
        return out

    @property
    def ladder(self) -> int:
        """The largest ``ladder_len`` of the chain's calibrator (TaylorSeer: its longest ladder)."""
        if self.calibrator.kind != "taylorseer":
            return self.calibrator.longest()
        return max([1, *(st.ladder for st in self.streams)])

    def names(self) -> list[str]:
        return [f.name for f in self.fields()]

    def stored_names(self) -> list[str]:
        """The activation-sized state a computed step stores and a cached one reads: the reference,
        then one ladder per stream (the order of :class:`~cachedit_fx.step.BranchOut`'s rows)."""
        return ["ref", *(f"ladder_{k}" for k in range(len(self.streams)))]

    def history_names(self) -> list[str]:
        """The small history counters a forecast reads besides ``ladder_len`` (DMD's), in the order the
        cond's branches take them."""
        return ["prev_ladder_len", "dmd_steps"] if self.calibrator.kind == "dmd" else []

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {f.name: (f.shape, f.dtype) for f in self.fields()}

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, JSON-able (export metadata)."""
        out = dataclasses.asdict(self)
        out["fn_shape"], out["fn_dtype"] = list(self.fn_shape), _dtype_name(self.fn_dtype)
        out["latent_shape"] = None if self.latent_shape is None else list(self.latent_shape)
        out["latent_dtype"] = _dtype_name(self.latent_dtype)
        out["streams"] = [{"shape": list(s.shape), "dtype": _dtype_name(s.dtype), "ladder": s.ladder,
                           "absolute": s.absolute, "calibrator": s.calibrator, "role": s.role} for s in self.streams]
        out["branch_by"] = self.branch_by.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChainLayout":
        streams = tuple(StreamSpec(tuple(s["shape"]), _dtype(s["dtype"]), s["ladder"], s["absolute"],
                                   s.get("calibrator", "taylorseer"), s.get("role", "H")) for s in d["streams"])
        latent = None if d["latent_shape"] is None else tuple(d["latent_shape"])
        calib = d.get("calibrator") or {"order": max(s.ladder for s in streams) - 1 if streams else 0}
        return cls(**{**d, "fn_shape": tuple(d["fn_shape"]), "fn_dtype": _dtype(d["fn_dtype"]), "streams": streams,
                      "branch_by": BranchBy(d["branch_by"]), "latent_shape": latent,
                      "latent_dtype": _dtype(d["latent_dtype"]), "calibrator": CalibratorSpec(**calib)})


def request_rows(layout) -> list[tuple]:
    """The first rows of every layout's state table (``(name, shape, dtype, reset(), clear)`` each): the
    request-level numbers, what tells requests and CFG branches apart, the call counters and the
    cached-step counters. ``layout``: anything with ``n_branches``, ``slots``, ``capacity``,
    ``latent_shape`` and ``latent_dtype``."""
    nb, s, cap, f64, i64 = layout.n_branches, layout.slots, layout.capacity, torch.float64, torch.int64
    never, request, context = Clear.NEVER, Clear.REQUEST, Clear.CONTEXT
    return [
        # name           shape                 dtype          reset()    cleared on device by
        ("params",       (len(PARAM_NAMES),),  f64,           None,      never),
        ("mask",         (cap,),               torch.int8,    None,      never),
        ("last_t",       (1,),                 f64,           -math.inf, never),
        ("t_dir",        (1,),                 f64,           0.0,       never),
        ("branch_hint",  (1,),                 i64,           -1,        never),
        ("last_dt",      (1,),                 f64,           0.0,       never),
        ("rate",         (1,),                 f64,           0.0,       never),
        ("prev_latent",  layout.latent_shape or (0,), layout.latent_dtype, 0.0, never),
        ("latent_seen",  (1,),                 torch.bool,    False,     never),
        ("refreshes",    (1,),                 i64,           0,         request),
        ("calls_total",  (1,),                 i64,           0,         context),
        ("calls",        (nb,),                i64,           0,         context),
        ("cached_count", (nb, s),              i64,           0,         context),
        ("run",          (nb, s),              i64,           0,         context),
    ]


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


def calibrator_spec(calib: CalibratorConfig | None) -> CalibratorSpec:
    """What a calibrator config compiles in (no calibrator: TaylorSeer of order 0, plain reuse)."""
    if calib is None or not (calib.enable_calibrator or calib.enable_encoder_calibrator):
        return CalibratorSpec()
    if isinstance(calib, DMDCalibratorConfig):
        return CalibratorSpec("dmd", calib.fallback_order, calib.dmd_history, calib.dmd_rank, float(calib.dmd_ridge))
    if calib.calibrator_type == "foca":
        return CalibratorSpec("foca")
    return CalibratorSpec("taylorseer", calib.taylorseer_order)


def stream_spec(shape: tuple[int, ...], dtype: torch.dtype, calib: CalibratorConfig | None,
                role: str) -> StreamSpec:
    """How a middle output of stream ``role`` ("H" / "E") is cached: H follows ``enable_calibrator``, E
    ``enable_encoder_calibrator``; a calibrated stream keeps its calibrator's history of its residual (or,
    with ``calibrator_cache_type="hidden_states"``, of the value itself), an uncalibrated one its last
    residual."""
    on = calib is not None and (calib.enable_calibrator if role == "H" else calib.enable_encoder_calibrator)
    if not on:
        return StreamSpec(shape, dtype, 1, role=role)
    spec = calibrator_spec(calib)
    return StreamSpec(shape, dtype, spec.entries(), calib.calibrator_cache_type == "hidden_states", spec.kind, role)


def diff_shared(cache: DBCacheConfig, n_branches: int) -> bool:
    """The second CFG call of a step reuses the first's diff (``cfg_diff_compute_separate=False``), as
    cache-dit does only when the non-CFG call comes first (``cfg_compute_first=False``)."""
    return n_branches == 2 and not cache.cfg_diff_compute_separate and not cache.cfg_compute_first


def params_from_config(cfg: DBCacheConfig) -> tuple[list[float], list[int]]:
    """The ``params`` vector (in ``PARAM_NAMES`` order) and the padded step mask of a cache config."""
    acc = cfg.max_accumulated_residual_diff_threshold
    mask = list(cfg.steps_computation_mask or [])[:LOG_CAPACITY]
    warmup = cfg.max_warmup_steps
    if mask:  # a mask's leading computed steps bound the warmup
        warmup = min(warmup, next((i for i, bit in enumerate(mask) if bit == 0), len(mask)))
    values = dict(threshold=cfg.residual_diff_threshold, warmup=warmup, interval=cfg.warmup_interval,
                  max_cached=cfg.max_cached_steps, max_continuous=cfg.max_continuous_cached_steps,
                  max_accumulated=0.0 if acc is None else acc, has_mask=float(bool(mask)),
                  static_mask=float(cfg.steps_computation_policy == "static"), n_steps=cfg.num_inference_steps or 0,
                  refresh_hint=cfg.force_refresh_step_hint or 0,
                  refresh_repeat=float(cfg.force_refresh_step_policy == "repeat"))
    return [float(values[name]) for name in PARAM_NAMES], mask + [0] * (LOG_CAPACITY - len(mask))


def cfg_branches(separate: SeparateCFG, sees_timestep: bool) -> tuple[int, BranchBy]:
    """State sets per chain and how a call picks one. AUTO tells a CFG pair's second call by its repeated
    timestep, on device; without a timestep (a graph after a graph break, e.g. Lumina2's) one set serves:
    cond and uncond calls usually differ in text length there and get state of their own per shape."""
    if separate is SeparateCFG.ON:
        return 2, BranchBy.PARITY
    if separate is SeparateCFG.AUTO and sees_timestep:
        return 2, BranchBy.TIMESTEP
    return 1, BranchBy.PARITY


Shape = tuple[int, ...]


def chain_layout(fn: tuple[Shape, torch.dtype], streams: list[tuple[Shape, torch.dtype, str]], cache: DBCacheConfig,
                 calib: CalibratorConfig | None, separate: SeparateCFG, sees_timestep: bool,
                 latent: tuple[Shape, torch.dtype] | None = None, group: str | None = None) -> ChainLayout:
    """The layout of a chain whose Fn residual has shape and dtype ``fn`` and whose middle produces
    ``streams`` (shape, dtype and role "H" / "E" of each, in order); ``latent``: the call's latent input,
    when the chain tells requests apart by it. The graph path and the eager cache both build it here."""
    n_branches, branch_by = cfg_branches(separate, sees_timestep)
    fn_shape, fn_dtype = tuple(fn[0]), fn[1]
    records_ratios = bool(getattr(cache, "calibrate", False))
    if records_ratios and calib is not None and calib.enable_calibrator and \
            calib.calibrator_cache_type == "hidden_states":
        raise ConfigError("calibrator_cache_type must be 'residual' with MagCacheConfig(calibrate=True) (the "
                          "calibration run records residual magnitudes), got 'hidden_states'")
    return ChainLayout(
        n_branches=n_branches, slots=fn_shape[0] if cache.per_sample else 1, fn_shape=fn_shape, fn_dtype=fn_dtype,
        streams=tuple(stream_spec(tuple(shape), dtype, calib, role) for shape, dtype, role in streams),
        diff_shared=diff_shared(cache, n_branches), branch_by=branch_by,
        latent_shape=tuple(latent[0]) if latent is not None else None,
        latent_dtype=latent[1] if latent is not None else torch.float32, group=group,
        calibrator=calibrator_spec(calib), indicator=indicator_of(cache),
        records_ratios=records_ratios)
