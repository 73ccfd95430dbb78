"""CogVideoX (1.0 / 2b style): 6 expert blocks over the joint text+video sequence, T5, tiny 3D VAE.

Blocks keep two streams (hidden_states, encoder_hidden_states) in and out.
"""
import torch

from ..components import t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family

TXT, FRAMES, SIZE = 16, 9, 32  # 9 frames -> 3 latent frames (4x temporal), 32 px -> 8x8 latent (3 levels)


def build_pipeline():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok)
    # Sin-cos position table covers text + video tokens, so the prompt must be exactly
    # max_text_seq_length tokens (the pipeline pads to max_sequence_length: keep them equal).
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=6, sample_width=SIZE // 4, sample_height=SIZE // 4, sample_frames=FRAMES,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TXT)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 3,
        up_block_types=["CogVideoXUpBlock3D"] * 3, block_out_channels=[8, 8, 8], latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    # CogVideoX's own scheduler settings (v-prediction, zero terminal SNR, trailing spacing).
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       clip_sample=False, timestep_spacing="trailing")
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                             transformer=transformer.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a cat walking", height=SIZE, width=SIZE, num_frames=FRAMES, guidance_scale=6.0,
                max_sequence_length=TXT, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    latent_frames = (FRAMES - 1) // 4 + 1
    return dict(
        # CogVideoX latents are (B, F, C, H, W)
        hidden_states=torch.randn(1, latent_frames, cfg.in_channels, SIZE // 4, SIZE // 4, generator=g),
        encoder_hidden_states=torch.randn(1, TXT, cfg.text_embed_dim, generator=g),
        timestep=torch.tensor([999]),
        return_dict=False,
    )


FAMILY = Family(
    name="cogvideox", pipeline_class="CogVideoXPipeline", transformer_class="CogVideoXTransformer3DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
    notes="CFG batched into one call; integer DDIM timesteps 0..999; latents are (B, F, C, H, W).",
)
