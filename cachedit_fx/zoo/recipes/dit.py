"""DiT: class-conditioned (ImageNet-style labels, no text encoder), 4 adaLN-Zero blocks, tiny VAE.

The transformer predicts a learned sigma: ``out_channels = 2 * in_channels``, the pipeline keeps the
first half (``zoo.denoise`` does the same). DiTPipeline batches cond and the null class (label 1000)
into one transformer call, so CFG is not separate.
"""
import torch

from ..components import kl_vae
from ..family import Family


def build_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    # sample_size is the latent side the pipeline samples at: 16x16 latents, 2x2 patches -> 64 tokens.
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    vae = kl_vae()
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(class_labels=[1], guidance_scale=4.0, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        timestep=torch.tensor([999]),  # DDIM feeds integer timesteps
        class_labels=torch.tensor([1]),
        return_dict=False,
    )


FAMILY = Family(
    name="dit", pipeline_class="DiTPipeline", transformer_class="DiTTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
)
