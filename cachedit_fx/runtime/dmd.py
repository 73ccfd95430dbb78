"""cache-dit 1.5.3's DMD forecast in fixed shapes, as pure tensor functions.

cache-dit fits, per batch item, ``Y_{t+k} ≈ Φ λ^k b`` on the evenly spaced tail of the last H snapshots:
an SVD of ``X = [y_0 .. y_{L-2}]``, the reduced operator ``Ã = U_rᴴ X' V_r (S_r + ridge)⁻¹``, its
eigenpairs ``(λ, W)``, ``Φ = X' V_r (S_r + ridge)⁻¹ W`` and ``b = lstsq(Φ, y_newest)``, with a host read
for the rank and data-dependent shapes. Here every matrix is H x H: the snapshots enter only through
their Gram matrix ``G = VᵀV`` (one batched matmul) and the forecast is a combination of them (another),
with the out-of-tail snapshots and truncated modes masked instead of sliced:

    V S² Vᵀ = eigh(XᵀX),  B = X' V diag(m / (S + ridge)),  Ã = diag(m / S) Vᵀ XᵀX' V diag(m / (S + ridge)),
    c = (BᵀB)⁻¹ Bᵀ y,  forecast = B Ãᵏ c  with  Ãᵏ = W diag(λᵏ) W⁻¹  (principal branch, as cache-dit)

which is cache-dit's ``Φ λᵏ b`` whenever W and Φ have full rank (``b = W⁻¹ c``). The truncated modes get
an eigenvalue of their own, away from the spectrum, whose terms vanish (their columns of B are zero).
Nothing reads the host; the small solvers (``eigh``, ``eig``) are LAPACK calls in the graph.
"""
from __future__ import annotations

import math

import torch

RANK_CUTOFF = 1e-4  # cache-dit: modes whose singular value is below this fraction of the largest are dropped


def uniform_tail(steps: torch.Tensor):
    """cache-dit's ``_uniform_tail`` over snapshot steps ``(S, H)`` (oldest .. newest, -1 empty).

    Returns (in_tail ``(S, H)`` bool, length ``(S,)``, spacing ``(S,)``): the longest run of newest
    snapshots whose gaps all equal the newest gap (length 0 with fewer than two snapshots)."""
    h = steps.shape[1]
    valid = steps >= 0
    gaps = steps[:, 1:] - steps[:, :-1]
    spacing = gaps[:, -1]
    equal = (gaps == spacing[:, None]) & valid[:, 1:] & valid[:, :-1]
    trailing = torch.flip(torch.cumprod(torch.flip(equal.long(), [1]), 1), [1]).sum(1)
    length = torch.where((valid.sum(1) >= 2) & (spacing > 0), trailing + 1, torch.zeros_like(trailing))
    in_tail = torch.arange(h, device=steps.device)[None, :] >= (h - length)[:, None]
    return in_tail, length, spacing


def _mode_mask(s: torch.Tensor, n_cols: torch.Tensor, rank: int) -> torch.Tensor:
    """(B, H-1) the modes cache-dit keeps: ``rank`` of them, or those above ``RANK_CUTOFF`` of the largest
    (at least one), never more than the tail's columns."""
    idx = torch.arange(s.shape[1], device=s.device)[None, :]
    keep = idx < rank if rank > 0 else (s > s[:, :1] * RANK_CUTOFF) | (idx == 0)
    return keep & (idx < n_cols.clamp(min=1)[:, None])


def _power_times(a: torch.Tensor, k: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a^k c`` per item for real exponents ``k`` (B,), from the eigenpairs of ``a`` (B, r, r)."""
    lam, w = torch.linalg.eig(a)
    v = torch.linalg.solve_ex(w, c.to(w.dtype))[0]
    return (w @ (lam.pow(k.to(torch.float64)[:, None]) * v[..., 0])[..., None]).real


def dmd_forecast(snaps: torch.Tensor, in_tail: torch.Tensor, length: torch.Tensor, k: torch.Tensor, rank: int,
                 ridge: float) -> torch.Tensor:
    """The DMD forecast ``k`` snapshot spacings past the newest snapshot, per batch item.

    Args:
        snaps: ``(H, *shape)`` oldest .. newest, any float dtype (fitted in float64 as cache-dit does).
        in_tail, length: :func:`uniform_tail`'s, per slot (1, or one per batch item).
        k: ``(S,)`` float64 horizons (fractional where the spacing does not divide the distance).
        rank, ridge: ``dmd_rank`` (0: from the spectrum) and ``dmd_ridge``.

    Returns:
        ``(*shape)`` float64; meaningful where ``length >= 4`` (callers select).
    """
    h, shape = snaps.shape[0], snaps.shape[1:]
    items = shape[0] if len(shape) > 1 else 1
    v = snaps.reshape(h, items, -1).permute(1, 2, 0).to(torch.float64)  # (B, d, H)
    tail = in_tail.expand(items, h).to(torch.float64)
    pair = tail[:, :-1] * tail[:, 1:]  # column j of X pairs with column j of X'
    both = pair[:, :, None] * pair[:, None, :]
    g = v.mT @ v
    xtx, xtxp, xptxp = g[:, :-1, :-1] * both, g[:, :-1, 1:] * both, g[:, 1:, 1:] * both
    xpty = g[:, 1:, -1:] * pair[:, :, None]
    lam, vecs = torch.linalg.eigh(xtx)
    lam, vecs = lam.flip(-1), vecs.flip(-1)  # descending, as an SVD orders them
    s = lam.clamp(min=0).sqrt()
    keep = _mode_mask(s, length.expand(items) - 1, rank).to(torch.float64)
    right = vecs * (keep / (s + ridge))[:, None, :]  # B = X' @ right
    left = vecs * (keep / torch.where(s > 0, s, torch.ones_like(s)))[:, None, :]
    a = left.mT @ xtxp @ right
    # eig refuses non-finite input (an error, not a value): such an item forecasts NaN, which the caller
    # turns into reuse, as cache-dit does with a failed fit
    usable = torch.isfinite(a).all(-1).all(-1)
    a = torch.where(usable[:, None, None], a, torch.zeros_like(a))
    btb = right.mT @ xptxp @ right + torch.diag_embed(1 - keep)
    c = torch.linalg.solve_ex(btb, right.mT @ xpty)[0]
    # a truncated mode's own eigenvalue, away from the spectrum (|λ| <= the Frobenius norm)
    apart = -(a.square().sum((-2, -1)).sqrt() + 1.0)
    a = a + torch.diag_embed((1 - keep) * apart[:, None])
    coef = right @ _power_times(a, k.expand(items), c)  # (B, H-1, 1): the forecast in X' columns
    pred = (v[:, :, 1:] @ (coef * pair[:, :, None]))[..., 0]
    return torch.where(usable[:, None], pred, torch.full_like(pred, math.nan)).reshape(shape)
