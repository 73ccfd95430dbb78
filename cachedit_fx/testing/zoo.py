"""Tiny, seeded, randomly initialised diffusers pipelines and transformers, built fully offline.

Each family lives in ``cachedit_fx/testing/families/<name>.py`` and exposes ``FAMILY``, a
:class:`Family`. This module is the one place tests, the demo and the benchmarks get models from.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import ConfigError, MissingDependency

ZOO_MODULES = ("transformers", "sentencepiece")  # the zoo extra; not needed by the cache itself
FAMILY_NAMES = (
    "flux", "sd3", "qwenimage", "wan", "cogvideox", "pixart", "sana", "hunyuanvideo", "ltx", "dit",
    "cogview4", "lumina2", "auraflow", "chroma", "hidream", "mochi", "allegro", "zimage",
)


@dataclass(frozen=True)
class Family:
    """How to build and drive one tiny model family.

    ``build_pipeline()`` returns a seeded pipeline in eval mode; ``pipeline_kwargs()`` the call
    arguments for it (prompt or embeddings, size, guidance, ``output_type``) except
    ``num_inference_steps`` and ``generator``. ``transformer_inputs(transformer, seed)`` returns the
    keyword arguments of one bare transformer call; ``uncond_inputs`` (separate-CFG families only)
    the arguments that replace them for the unconditional call.
    """

    name: str
    pipeline_class: str  # the diffusers class names build_pipeline() constructs
    transformer_class: str
    build_pipeline: Callable[[], Any]
    pipeline_kwargs: Callable[[], dict]
    transformer_inputs: Callable[[torch.nn.Module, int], dict]
    latent_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    timestep_max: float = 1000.0
    separate_cfg: bool = False
    uncond_inputs: Callable[[torch.nn.Module, int], dict] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def get(name: str) -> Family:
    if name not in FAMILY_NAMES:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of: {', '.join(FAMILY_NAMES)}")
    missing = [m for m in ZOO_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"the offline zoo builds its tokenizers and text encoders with {' and '.join(missing)}: "
                                "pip install 'cachedit-fx[zoo]' (the command line's extra, [cli], includes it)")
    return importlib.import_module(f"cachedit_fx.testing.families.{name}").FAMILY


def families() -> list[Family]:
    return [get(n) for n in FAMILY_NAMES]


def family_for_transformer(cls: type) -> Family | None:
    """The family whose transformer is an instance of ``cls`` (by class name), or None."""
    return next((f for f in families() if f.transformer_class == cls.__name__), None)


def build_pipeline(name: str):
    return get(name).build_pipeline()


def build_transformer(name: str, seed: int = 0):
    """The family's transformer (from its pipeline) and the kwargs of one call."""
    fam = get(name)
    transformer = fam.build_pipeline().transformer
    return transformer, fam.transformer_inputs(transformer, seed)


def run_pipeline(pipe, name: str, num_inference_steps: int = 4, seed: int = 0, **overrides):
    kwargs = {**get(name).pipeline_kwargs(), **overrides}
    out = pipe(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return _first_output(out)


def _first_output(out):
    for key in ("images", "frames"):
        if hasattr(out, key):
            value = getattr(out, key)
            return torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    return out[0]


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
