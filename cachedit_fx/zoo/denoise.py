"""A hand-written Euler loop over a bare transformer, as flow-matching pipelines drive it."""
from __future__ import annotations

import torch

from .build import get
from .family import Family


def _model_output(out):
    out = out[0] if isinstance(out, (tuple, list)) and not isinstance(out[0], (int, float)) else out
    return out.sample if hasattr(out, "sample") else out


def denoise(transformer, family: Family | str, inputs: dict, num_steps: int = 8,
            guidance: float = 2.0, uncond: dict | None = None, call=None):
    """A hand-written Euler loop over the bare transformer.

    Timesteps fall linearly from ``timestep_max`` to near zero, like the flow-matching pipelines.
    With ``uncond`` the transformer is called twice per step (cond, then uncond), as separate-CFG
    pipelines do. ``call`` replaces the transformer call (e.g. a compiled module). Returns the final
    latent and the per-call model outputs.
    """
    fam = get(family) if isinstance(family, str) else family
    call = transformer if call is None else call
    x = inputs[fam.latent_arg]
    ref_t = inputs[fam.timestep_arg]
    outputs = []
    for i in range(num_steps):
        frac = 1.0 - i / num_steps
        t = torch.full_like(ref_t, fam.timestep_max * frac) if isinstance(ref_t, torch.Tensor) else fam.timestep_max * frac
        step_in = {**inputs, fam.latent_arg: x, fam.timestep_arg: t}
        with torch.no_grad():
            pred = _model_output(call(**step_in))
            if uncond is not None:
                pred = _guide(_model_output(call(**{**step_in, **uncond})), pred, guidance)
        outputs.append(pred)
        dt = 1.0 / num_steps
        if isinstance(x, (list, tuple)):
            x = type(x)(xi - dt * _match(pi, xi) for xi, pi in zip(x, pred))
        else:
            x = x - dt * _match(pred, x)
    return x, outputs


def _guide(uncond, cond, scale):
    if isinstance(cond, (list, tuple)):
        return [u + scale * (c - u) for u, c in zip(uncond, cond)]
    return uncond + scale * (cond - uncond)


def _match(pred, x):
    """Models that predict extra channels (learned sigma: a multiple of the latent's) or that return the
    whole joint sequence (the prompt's tokens, then the latent's) return more than the latent holds; a
    latent that carries conditioning channels after its noisy ones gets a prediction of the noisy ones
    only (the conditioning stays as it is)."""
    if pred.shape != x.shape and pred.dim() == x.dim() and pred.shape[1] > x.shape[1]:
        pred = pred[:, : x.shape[1]] if pred.shape[1] % x.shape[1] == 0 else pred[:, -x.shape[1]:]
    elif pred.shape != x.shape and pred.dim() == x.dim() and pred.shape[2:] == x.shape[2:]:
        pred = torch.cat([pred, pred.new_zeros((pred.shape[0], x.shape[1] - pred.shape[1]) + pred.shape[2:])], 1)
    return pred.reshape(x.shape)
