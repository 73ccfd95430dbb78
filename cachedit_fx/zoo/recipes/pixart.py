"""PixArt-Sigma: 6 DiT blocks with cross-attention to T5 text, tiny 3-level VAE, DPM-Solver.

The transformer predicts a learned sigma too (out_channels = 2 * latent channels).
"""
import torch

from ..components import kl_vae, t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family


def build_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok)
    # sample_size != 128 turns the resolution/aspect-ratio conditioning off (PixArt-Sigma has none).
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=6, patch_size=2, attention_head_dim=16, num_attention_heads=2,
        caption_channels=32, in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    vae = kl_vae((8, 8, 16), sample_size=64)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    # Resolution binning would snap 64x64 to the nearest of PixArt's real aspect-ratio buckets (>= 256 px).
    return dict(prompt="a photo of a cat", height=64, width=64, guidance_scale=4.5, max_sequence_length=32,
                use_resolution_binning=False, clean_caption=False, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    txt = 12
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, txt, cfg.caption_channels, generator=g),
        encoder_attention_mask=(torch.arange(txt) < 9).long()[None],
        timestep=torch.tensor([999]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


FAMILY = Family(
    name="pixart", pipeline_class="PixArtSigmaPipeline", transformer_class="PixArtTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
    notes="CFG batched into one call; integer timesteps 0..999 (DPM-Solver); output has 2x latent "
          "channels (learned sigma), the pipeline keeps the first half.",
)
