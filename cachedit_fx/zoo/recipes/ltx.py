"""LTX-Video: 4 blocks over a packed (B, tokens, C) video sequence, T5 text encoder, tiny video VAE.

LTXPipeline batches cond and uncond into one transformer call, so CFG is not separate.
"""
import torch

from ..components import t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family

TEXT_DIM = 32


def build_pipeline():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok, d_model=TEXT_DIM)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=4, caption_channels=TEXT_DIM)
    # Two spatio-temporal downsamples: 4x spatial, 4x temporal compression.
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    # Frame-by-frame decoding is a memory saver for long videos; one pass is faster here.
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                       tokenizer=tok, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    # 9 frames -> 3 latent frames; 32x32 -> 8x8 latents: 192 video tokens.
    return dict(prompt="a cat walking", negative_prompt="", height=32, width=32, num_frames=9,
                guidance_scale=3.0, max_sequence_length=16, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames, side, txt = 2, 4, 16
    return dict(
        hidden_states=torch.randn(1, frames * side * side, transformer.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, TEXT_DIM, generator=g),
        timestep=torch.tensor([1000.0]),
        encoder_attention_mask=torch.ones(1, txt),
        num_frames=frames, height=side, width=side,
        rope_interpolation_scale=(4 / 25, 4, 4),  # (temporal ratio / frame rate, spatial, spatial)
        return_dict=False,
    )


FAMILY = Family(
    name="ltx", pipeline_class="LTXPipeline", transformer_class="LTXVideoTransformer3DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
)
