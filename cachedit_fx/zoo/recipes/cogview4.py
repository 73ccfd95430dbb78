"""CogView4: 4 joint-attention blocks, a tiny GLM text encoder, tiny 2-level VAE.

With ``guidance_scale > 1`` the pipeline calls the transformer twice per step (cond, then uncond)
rather than batching the two, so the family is ``separate_cfg``.
"""
import torch

from ..components import kl_vae
from ..tokenizers import glm_tokenizer
from ..family import Family


def build_pipeline():
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmForCausalLM

    tok = glm_tokenizer()
    torch.manual_seed(0)
    text_encoder = GlmForCausalLM(GlmConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4)
    vae = kl_vae()
    # CogView4 passes `mu` (resolution-dependent shift) to the scheduler: dynamic shifting must be on
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=tok, text_encoder=text_encoder.eval(), vae=vae.eval(),
                            transformer=transformer.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=5.0, height=32, width=32,
                max_sequence_length=32, output_type="pt")


def _size_conditions():
    size = torch.tensor([[32.0, 32.0]])
    return dict(original_size=size, target_size=size.clone(), crop_coords=torch.zeros(1, 2))


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    # the pipeline left-pads text to a multiple of 16 tokens
    return dict(hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 16, cfg.text_embed_dim, generator=g),
                timestep=torch.tensor([1000.0]), **_size_conditions(), return_dict=False)


def uncond_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return dict(encoder_hidden_states=torch.randn(1, 16, transformer.config.text_embed_dim, generator=g))


FAMILY = Family(
    name="cogview4", pipeline_class="CogView4Pipeline", transformer_class="CogView4Transformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, timestep_max=1000.0, separate_cfg=True, uncond_inputs=uncond_inputs,
)
