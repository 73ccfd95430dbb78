"""How a stream's history forecasts its cached value, per calibrator, as pure tensor functions.

Each middle output keeps a history tensor (the state table's ``ladder_k``, ``(K, *shape)`` per CFG
branch) and the chain's per-slot counters (``ladder_len``, ``last_computed`` ...). Per kind:

- **TaylorSeer** (K = order + 1, 1 = plain reuse): the derivative ladder of :mod:`.algorithm`.
- **FoCa** (K = 4): ``[F_k, F_km1, F_full, F_full_prev]``, ``ladder_len`` = computed values held (<= 2).
  A cached step forecasts and *writes* ``F_k, F_km1`` (the only calibrator whose cached steps store).
- **DMD** (K = H + 2(n + 1)): H snapshots (oldest .. newest), then the Taylor fallback's ladder and
  the one before it (cache-dit differences against the ladder two updates back: reproduced);
  ``ladder_len`` / ``prev_ladder_len`` their valid entries, ``dmd_steps`` the snapshots' steps.

The graph's cond branches and the eager cache both call :func:`forecast` and :func:`update`;
:func:`commit_history` is the counters' part of :func:`~cachedit_fx.runtime.step.post_step`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .algorithm import next_ladder_len, slot_view, taylor_approx, taylor_update
from .dmd import dmd_forecast, uniform_tail
from .layout import CalibratorSpec, StreamSpec

FOCA_HORIZON = 3.0  # cache-dit: beyond 3 steps the Heun step is damped towards F_full


class Counters(NamedTuple):
    """The call's branch's per-slot counters a forecast or an update reads."""

    ladder_len: torch.Tensor  # (S,) valid history entries (see the module docstring)
    distance: torch.Tensor  # (S,) float32, steps since the last computed step
    step: torch.Tensor  # 0-dim, the branch's step
    prev_len: torch.Tensor | None = None  # (S,) DMD: the previous fallback ladder's valid entries
    snap_steps: torch.Tensor | None = None  # (S, H) DMD: the snapshots' steps, -1 empty


def writes_on_cache(spec: StreamSpec) -> bool:
    """Whether a cached step stores this stream's history (FoCa's forecast becomes ``F_k``)."""
    return spec.calibrator == "foca"


def _scaled(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``x * c`` the way eager PyTorch multiplies a tensor by a Python float: ``c`` (float64, per slot)
    in the op's math precision (float32 for half types), rounded once to ``x``'s dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return (x.float() * c.float()).to(x.dtype)
    return x * c.to(x.dtype)


def foca_forecast(hist: torch.Tensor, n: torch.Tensor, distance: torch.Tensor):
    """cache-dit's ``FoCaState.approximate``: (forecast, new history). With fewer than two computed values
    the forecast is ``F_full`` and the history is unchanged."""
    fk, fkm1, full, full_prev = hist.unbind(0)
    e = slot_view(distance.to(torch.float64), full)
    s = (full - full_prev) + (fk - fkm1)
    heun = full + _scaled(s, e / 2.0)
    w = FOCA_HORIZON / e
    damped = _scaled(full + _scaled(s, torch.full_like(e, FOCA_HORIZON / 2.0)), w) + _scaled(full, 1.0 - w)
    ready = slot_view(n >= 2, full)
    pred = torch.where(ready, torch.where(e <= FOCA_HORIZON, heun, damped), full)
    return pred, torch.where(ready.unsqueeze(0), torch.stack([pred, fk, full, full_prev]), hist)


def _dmd_parts(calib: CalibratorSpec, hist: torch.Tensor):
    h, n = calib.history, calib.order + 1
    return hist[:h], hist[h:h + n], hist[h + n:]


def dmd_step_forecast(calib: CalibratorSpec, hist: torch.Tensor, c: Counters) -> torch.Tensor:
    """cache-dit's ``DMDState.approximate``: the DMD forecast on an evenly spaced tail of 4 or more
    snapshots (the newest snapshot where it is not finite after the cast), else the Taylor fallback."""
    snaps, ladder, _ = _dmd_parts(calib, hist)
    fallback = taylor_approx(ladder, c.ladder_len, c.distance)
    if calib.history < 4:  # the fit never engages
        return fallback
    in_tail, length, spacing = uniform_tail(c.snap_steps)
    k = c.distance.to(torch.float64) / spacing.clamp(min=1).to(torch.float64)
    pred = dmd_forecast(snaps, in_tail, length, k, calib.rank, calib.ridge).to(snaps.dtype)
    pred = torch.where(torch.isfinite(pred).all(), pred, snaps[-1])
    return torch.where(slot_view(length >= 4, pred), pred, fallback)


def forecast(calib: CalibratorSpec, spec: StreamSpec, hist: torch.Tensor, c: Counters):
    """A cached step's value of the stream's residual (or hidden states), and its history afterwards
    (``hist`` itself unless the calibrator stores on cached steps)."""
    if spec.calibrator == "foca":
        return foca_forecast(hist, c.ladder_len, c.distance)
    if spec.calibrator == "dmd":
        return dmd_step_forecast(calib, hist, c), hist
    return taylor_approx(hist, c.ladder_len, c.distance), hist


def update(calib: CalibratorSpec, spec: StreamSpec, hist: torch.Tensor, c: Counters, value: torch.Tensor):
    """The stream's history after a computed step with ``value``."""
    if spec.calibrator == "foca":
        fk, _, full, _ = hist.unbind(0)
        return torch.stack([value, fk, value, full])
    if spec.calibrator == "dmd":
        snaps, ladder, prev = _dmd_parts(calib, hist)
        fresh = taylor_update(prev, c.prev_len, value, c.distance, c.step)
        return torch.cat([snaps[1:], value.unsqueeze(0), fresh, ladder])
    return taylor_update(hist, c.ladder_len, value, c.distance, c.step)


def last_value(calib: CalibratorSpec, spec: StreamSpec, hist: torch.Tensor) -> torch.Tensor:
    """The value the stream's last computed step stored."""
    if spec.calibrator == "foca":
        return hist[2]
    if spec.calibrator == "dmd":
        return hist[calib.history - 1]
    return hist[0]


def commit_history(kind: str, longest: int, kept, computed, step, ladder_len, prev_len=None, dmd_steps=None):
    """The history counters after a step (per slot): a kept computed step grows them (``ladder_len`` up
    to ``longest``), a computed step whose values are not finite empties them, a cached step leaves
    them. Returns the new values by state name."""

    def after(grown, emptied, unchanged):
        k, c = slot_view(kept, unchanged), slot_view(computed, unchanged)
        return torch.where(k, grown, torch.where(c, emptied, unchanged))

    zero = torch.zeros_like(ladder_len)
    if kind == "foca":
        return {"ladder_len": after((ladder_len + 1).clamp(max=longest), zero, ladder_len)}
    if kind != "dmd":
        return {"ladder_len": after(next_ladder_len(ladder_len, step, longest), zero, ladder_len)}
    shifted = torch.cat([dmd_steps[:, 1:], step.reshape(1, 1).expand(dmd_steps.shape[0], 1)], dim=1)
    return {"ladder_len": after(next_ladder_len(prev_len, step, longest), zero, ladder_len),
            "prev_ladder_len": after(ladder_len, zero, prev_len),
            "dmd_steps": after(shifted, torch.full_like(dmd_steps, -1), dmd_steps)}
