"""Flux.1: 4 double-stream + 4 single-stream blocks, CLIP + T5 text encoders, tiny 2-level VAE."""
import torch

from ..components import clip_text_encoder, latent_image_ids, sd3_kl_vae, t5_encoder
from ..tokenizers import clip_tokenizer, t5_tokenizer
from ..family import Family


def build_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = clip_text_encoder(tok)
    text_encoder_2 = t5_encoder(tok2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=4, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    vae = sd3_kl_vae()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                        tokenizer=tok, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tok2,
                        transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", height=64, width=64, guidance_scale=3.5,
                max_sequence_length=32, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    side, txt = 8, 12
    return dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([1.0]),
        img_ids=latent_image_ids(side),
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


FAMILY = Family(
    name="flux", pipeline_class="FluxPipeline", transformer_class="FluxTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1.0,
)
