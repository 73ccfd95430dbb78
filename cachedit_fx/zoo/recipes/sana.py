"""Sana: 4 linear-attention blocks, Gemma2 text encoder, tiny deep-compression (DC) autoencoder.

SanaPipeline batches cond and uncond into one transformer call, so CFG is not separate.
"""
import torch

from ..components import gemma2_encoder
from ..tokenizers import gemma_tokenizer
from ..family import Family

TEXT_DIM = 16


def build_pipeline():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tok = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = gemma2_encoder(tok, hidden_size=TEXT_DIM)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=4, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_DIM, sample_size=16)
    # Two levels: 2x spatial compression.
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    # Resolution binning would snap 32x32 to the nearest trained aspect-ratio bucket (512+ px);
    # the default complex_human_instruction prepends ~2000 characters of system prompt.
    return dict(prompt="a photo of a cat", negative_prompt="", height=32, width=32, guidance_scale=4.5,
                max_sequence_length=16, use_resolution_binning=False, complex_human_instruction=None,
                clean_caption=False, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    side, txt = 16, 16
    return dict(
        hidden_states=torch.randn(1, transformer.config.in_channels, side, side, generator=g),
        encoder_hidden_states=torch.randn(1, txt, TEXT_DIM, generator=g),
        encoder_attention_mask=torch.ones(1, txt),
        timestep=torch.tensor([1000.0]),
        return_dict=False,
    )


FAMILY = Family(
    name="sana", pipeline_class="SanaPipeline", transformer_class="SanaTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
)
