"""What one zoo family is: how to build and drive its tiny model (:class:`Family`), and the names
of the families (one recipe module each in ``recipes/``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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
