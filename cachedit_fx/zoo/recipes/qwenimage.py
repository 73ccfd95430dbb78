"""Qwen-Image: 4 MMDiT blocks, a tiny Qwen2.5-VL text encoder, the causal 3D Qwen-Image VAE.

True CFG: with ``true_cfg_scale > 1`` and a negative prompt the pipeline calls the transformer twice
per step (cond, then uncond), so the family is ``separate_cfg``.
"""
import torch

from ..tokenizers import qwen2_tokenizer
from ..family import Family


def build_pipeline():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen2_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                         rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default")),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=len(tok)))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    # 2 spatial downsamples (vae_scale_factor 4); z_dim 4 packs 2x2 into the transformer's 16 channels
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                             text_encoder=text_encoder.eval(), tokenizer=tok, transformer=transformer.eval())
    # Trap: the real drop index (34) counts real Qwen tokens of the system prompt; with a byte-level
    # vocab it would cut inside the system prompt and keep it, so recount it for this tokenizer.
    pipe.prompt_template_encode_start_idx = len(tok(pipe.prompt_template_encode.split("{}")[0]).input_ids)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                max_sequence_length=32, output_type="pt")


def _text(transformer, g, txt):
    return dict(encoder_hidden_states=torch.randn(1, txt, transformer.config.joint_attention_dim, generator=g),
                encoder_hidden_states_mask=torch.ones(1, txt, dtype=torch.long))


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = 8  # packed 2x2 patches of a 16x16 latent
    return dict(hidden_states=torch.randn(1, side * side, transformer.config.in_channels, generator=g),
                **_text(transformer, g, 12), timestep=torch.tensor([1.0]),
                img_shapes=[[(1, side, side)]], return_dict=False)


def uncond_inputs(transformer, seed=0):
    return _text(transformer, torch.Generator().manual_seed(seed + 1), 7)


FAMILY = Family(
    name="qwenimage", pipeline_class="QwenImagePipeline", transformer_class="QwenImageTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1.0, separate_cfg=True, uncond_inputs=uncond_inputs,
)
