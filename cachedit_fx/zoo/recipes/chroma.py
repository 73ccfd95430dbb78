"""Chroma: 4 double-stream + 4 single-stream blocks (Flux-like), T5 text encoder, tiny 2-level VAE.

Block contract: the single blocks take the concatenated text+image sequence (one stream), unlike Flux.
The pipeline calls the transformer twice per step (cond, then uncond) -> separate CFG.
"""
import torch

from ..components import latent_image_ids, sd3_kl_vae, t5_encoder
from ..tokenizers import t5_tokenizer
from ..family import Family

TXT = 12


def build_pipeline():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tok = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = t5_encoder(tok)
    # The "approximator" makes every block's modulation from the timestep alone (no pooled text).
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=4, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6],
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)
    vae = sd3_kl_vae()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                          tokenizer=tok, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", negative_prompt="blurry", height=64, width=64, guidance_scale=4.0,
                max_sequence_length=32, output_type="pt")


def _text(transformer, g, n_tokens):
    """Text embeddings plus the pipeline's mask: text tokens and one pad visible, image tokens visible."""
    side = 8
    mask = torch.cat([(torch.arange(TXT) <= n_tokens).float(), torch.ones(side * side)])[None]
    return dict(encoder_hidden_states=torch.randn(1, TXT, transformer.config.joint_attention_dim, generator=g),
                txt_ids=torch.zeros(TXT, 3), attention_mask=mask)


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = 8
    return dict(
        hidden_states=torch.randn(1, side * side, transformer.config.in_channels, generator=g),
        timestep=torch.tensor([1.0]),
        img_ids=latent_image_ids(side),
        **_text(transformer, g, n_tokens=8),
        return_dict=False,
    )


def uncond_inputs(transformer, seed=0):
    return _text(transformer, torch.Generator().manual_seed(seed + 1), n_tokens=2)


FAMILY = Family(
    name="chroma", pipeline_class="ChromaPipeline", transformer_class="ChromaTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1.0, separate_cfg=True, uncond_inputs=uncond_inputs,
    notes="Separate CFG: cond then uncond call per step, each with its own text embeddings and mask; "
          "the pipeline feeds t / 1000 to the transformer.",
)
