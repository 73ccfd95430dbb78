"""Stable Diffusion 3: 4 joint (MMDiT) blocks, two CLIP + one T5 text encoder, tiny 3-level VAE.

Block contract: the last joint block is ``context_pre_only`` and returns ``None`` for the text stream.
"""
import torch

from ..components import clip_text_encoder, sd3_kl_vae, t5_encoder
from ..tokenizers import clip_tokenizer, t5_tokenizer
from ..family import Family


def build_pipeline():
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = clip_text_encoder(tok, with_projection=True).eval()
    text_encoder_2 = clip_text_encoder(tok2, with_projection=True).eval()
    # The two CLIP streams (32 + 32) are zero-padded up to T5's width, so T5 d_model must be >= 64.
    text_encoder_3 = t5_encoder(tok3, d_model=64, d_kv=16).eval()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32).eval()
    vae = sd3_kl_vae((8, 8, 16), sample_size=64).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok2,
        text_encoder_3=text_encoder_3, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", height=64, width=64, guidance_scale=5.0,
                max_sequence_length=32, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 12, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([1000.0]),
        return_dict=False,
    )


FAMILY = Family(
    name="sd3", pipeline_class="StableDiffusion3Pipeline", transformer_class="SD3Transformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
    notes="CFG batched into one call; the last joint block returns None for encoder_hidden_states.",
)
