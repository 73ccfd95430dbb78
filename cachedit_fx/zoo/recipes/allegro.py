"""Allegro text-to-video: 4 blocks, T5 text encoder, tiny 4-level 3D VAE, DDIM scheduler.

AllegroPipeline batches cond and uncond into one transformer call, so CFG is not separate.
"""
from types import SimpleNamespace

import torch

from ..components import t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family

TEXT_DIM = 24
FRAMES, SIDE = 8, 64  # -> 2 latent frames of 8x8, 2x2 patches: 32 video tokens


def build_pipeline():
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro, DDIMScheduler
    
    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok, d_model=TEXT_DIM, relative_attention_num_buckets=8)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=4,
        cross_attention_dim=24, caption_channels=TEXT_DIM, sample_width=8, sample_height=8, sample_frames=2)
    vae = AutoencoderKLAllegro(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4)
    # The VAE only decodes tiled, and its default tile (24 frames x 320 px, overlaps 8/120/80) is bigger
    # than this video: no tile fits, nothing is decoded and every frame comes out grey. One tile, no overlap.
    vae.enable_tiling()
    vae.kernel = vae.stride = (FRAMES, SIDE, SIDE)
    pipe = AllegroPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                           transformer=transformer.eval(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a cat walking", negative_prompt="", height=SIDE, width=SIDE, num_frames=FRAMES,
                guidance_scale=6.0, max_sequence_length=16, clean_caption=False, output_type="pt")


def transformer_inputs(transformer, seed=0):
    from diffusers import AllegroPipeline

    g = torch.Generator().manual_seed(seed)
    frames, side, txt = 2, 8, 16
    # Reuse the pipeline's own RoPE construction; it only reads these two attributes.
    stub = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=8)
    rope = AllegroPipeline._prepare_rotary_positional_embeddings(stub, 1, side * 8, side * 8, frames, "cpu")
    return dict(
        hidden_states=torch.randn(1, transformer.config.in_channels, frames, side, side, generator=g),
        encoder_hidden_states=torch.randn(1, txt, TEXT_DIM, generator=g),
        encoder_attention_mask=torch.ones(1, txt),
        timestep=torch.tensor([999]),
        image_rotary_emb=rope,
        return_dict=False,
    )


FAMILY = Family(
    name="allegro", pipeline_class="AllegroPipeline", transformer_class="AllegroTransformer3DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
)
