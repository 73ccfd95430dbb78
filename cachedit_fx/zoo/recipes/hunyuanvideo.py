"""HunyuanVideo: 4 dual-stream + 4 single-stream blocks (both keep two streams), Llama + CLIP text
encoders, a tiny causal 3D VAE (8x spatial, 4x temporal), a 5-frame 32x32 video.

Guidance-distilled: ``guidance_scale`` goes into the transformer and true CFG stays off, so one
transformer call per step.
"""
from functools import lru_cache

import torch

from ..components import clip_text_encoder, llama_encoder
from ..tokenizers import clip_tokenizer, llama_tokenizer
from ..family import Family

_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@lru_cache(maxsize=1)
def _prompt_template():
    # Trap: the default crop_start (95) counts Llama-3 tokens of the system prompt; char-level tokens
    # are far more, so 95 would keep most of the system prompt instead of the user's. Recount it.
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    crop_start = len(llama_tokenizer(_SPECIALS)(template.split("{}")[0]).input_ids)
    return {"template": template, "crop_start": crop_start}


def build_pipeline():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)

    tok, tok2 = llama_tokenizer(_SPECIALS), clip_tokenizer()
    torch.manual_seed(0)
    # 3 layers: the pipeline takes hidden_states[-3], which with 2 layers is the bare embedding
    text_encoder = llama_encoder(tok, 3)
    text_encoder_2 = clip_text_encoder(tok2, hidden_size=8, projection_dim=None)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=4,
        num_single_layers=4, num_refiner_layers=4, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4)
    pipe = HunyuanVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=tok, text_encoder_2=text_encoder_2.eval(), tokenizer_2=tok2, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", prompt_template=_prompt_template(), height=32, width=32, num_frames=5,
                guidance_scale=4.5, max_sequence_length=32, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    txt = 12
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g),
        timestep=torch.tensor([1000.0]),
        encoder_hidden_states=torch.randn(1, txt, cfg.text_embed_dim, generator=g),
        encoder_attention_mask=torch.ones(1, txt, dtype=torch.long),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        guidance=torch.tensor([4500.0]),
        return_dict=False,
    )


FAMILY = Family(
    name="hunyuanvideo", pipeline_class="HunyuanVideoPipeline", transformer_class="HunyuanVideoTransformer3DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0,
)
