"""Wan 2.1 text-to-video: 4 blocks, UMT5 text encoder, tiny causal 3D VAE.

WanPipeline runs CFG as two transformer calls per step (cond, then uncond), so the family is
``separate_cfg`` and ``pipeline_kwargs`` keep ``guidance_scale > 1``.
"""
import torch

from ..components import t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family

TEXT_DIM = 32


def build_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tok = t5_tokenizer()  # UMT5 reads the same SentencePiece-style vocabulary
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok, d_model=TEXT_DIM, umt5=True, relative_attention_num_buckets=8)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=4, rope_max_seq_len=32)
    # 3 spatial downsamples (x8) and 2 temporal (x4), as the pipeline's scale factors assume.
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    # 5 frames -> 2 latent frames; 32x32 -> 4x4 latents -> 2x2 patches: 8 video tokens.
    return dict(prompt="a cat walking", negative_prompt="blurry", height=32, width=32, num_frames=5,
                guidance_scale=5.0, max_sequence_length=16, output_type="pt")


def _text(seed, txt=16):
    return torch.randn(1, txt, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, transformer.config.in_channels, 2, 4, 4, generator=g),
        timestep=torch.tensor([1000.0]),
        encoder_hidden_states=_text(seed + 1),
        return_dict=False,
    )


def uncond_inputs(transformer, seed=0):
    return dict(encoder_hidden_states=_text(seed + 2))


FAMILY = Family(
    name="wan", pipeline_class="WanPipeline", transformer_class="WanTransformer3DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
    separate_cfg=True, uncond_inputs=uncond_inputs,
)
