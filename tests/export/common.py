"""What the export tests share: the cache config, the Flux pipeline's own call, Flux inputs of any batch and
resolution, and a dynamic-shapes spec for them."""
from __future__ import annotations

import torch

from cachedit_fx import zoo

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.6, max_warmup_steps=2)


def pipeline_call_kwargs(pipe):
    """The kwargs of the pipeline's first transformer call, to export for exactly those shapes."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    zoo.run_pipeline(pipe, "flux", num_inference_steps=1)
    handle.remove()
    return seen[0]


def flux_inputs(transformer, batch: int, side: int, seed: int = 1) -> dict:
    from cachedit_fx.zoo.components import latent_image_ids

    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(hidden_states=torch.randn(batch, side * side, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 12, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.ones(batch), img_ids=latent_image_ids(side), txt_ids=torch.zeros(12, 3),
                return_dict=False)


def dynamic_spec():
    from torch.export import Dim

    batch, tokens = Dim("batch", max=8), Dim("tokens", min=16, max=1024)
    return {"hidden_states": {0: batch, 1: tokens}, "img_ids": {0: tokens}, "encoder_hidden_states": {0: batch},
            "pooled_projections": {0: batch}, "timestep": {0: batch}}
