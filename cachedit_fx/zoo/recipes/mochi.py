"""Mochi-1: 6 asymmetric joint blocks (wide video stream, narrow text stream), T5, tiny Mochi VAE.

Block contract: the last block is ``context_pre_only`` and returns the text stream unchanged.
The attention processor drops padded text tokens with ``torch.nonzero`` (data-dependent shapes).
"""
import torch

from ..components import t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family

TXT, FRAMES, SIZE = 16, 13, 32  # the pipeline hard-codes 8x spatial / 6x temporal VAE compression


def build_pipeline():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    tok = t5_tokenizer(max_length=TXT)
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=6, pooled_projection_dim=16,
        in_channels=12, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=TXT)
    # RoPE frequencies are a zero-initialised parameter (learned): zeros make RoPE an identity.
    transformer.pos_frequencies.data.normal_()
    # Three up/down levels are fixed by the expansions; GroupNorm has 32 groups, so 32 channels minimum.
    vae = AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False,) * 5)
    # Real Mochi's scheduler config: the transformer sees 1000 * (1 - sigma), rising 0 -> 1000.
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=vae.eval(),
                         text_encoder=text_encoder.eval(), tokenizer=tok, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a cat walking", height=SIZE, width=SIZE, num_frames=FRAMES, guidance_scale=4.5,
                max_sequence_length=TXT, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    latent_frames = (FRAMES - 1) // 6 + 1
    return dict(
        # Mochi latents are (B, C, F, H, W)
        hidden_states=torch.randn(1, cfg.in_channels, latent_frames, SIZE // 8, SIZE // 8, generator=g),
        encoder_hidden_states=torch.randn(1, TXT, cfg.text_embed_dim, generator=g),
        encoder_attention_mask=(torch.arange(TXT) < 9).long()[None],
        timestep=torch.tensor([1000.0]),
        return_dict=False,
    )


FAMILY = Family(
    name="mochi", pipeline_class="MochiPipeline", transformer_class="MochiTransformer3DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
    notes="CFG batched into one call; timesteps in 0..1000 but reversed (invert_sigmas: the pipeline "
          "feeds 1000 * (1 - sigma), rising from ~0 to 1000); "
          "attention drops padded text tokens via torch.nonzero (data-dependent).",
)
