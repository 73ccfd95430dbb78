"""Z-Image: 4 refiner blocks on each stream (``noise_refiner`` on the image, ``context_refiner`` on the
caption) before 4 joint ``layers``, a tiny Qwen3 text encoder, tiny 2-level VAE.

The transformer takes lists of per-sample tensors and names its inputs ``x``, ``t``, ``cap_feats``;
blocks name their input ``x`` too. CFG is batched (one call on cond + uncond lists), so not
``separate_cfg``.
"""
import torch

from ..components import kl_vae
from ..tokenizers import qwen2_tokenizer
from ..family import Family

# Trap: the pipeline formats prompts with apply_chat_template, which fails without a template.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = qwen2_tokenizer(chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=4, n_refiner_layers=4,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    vae = kl_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                          text_encoder=text_encoder.eval(), tokenizer=tok, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    return dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=4.0, height=32, width=32,
                max_sequence_length=64, output_type="pt")


def transformer_inputs(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(transformer.in_channels, 1, 16, 16, generator=g)],  # (C, frames, H, W) per sample
        t=torch.tensor([1.0]),
        cap_feats=[torch.randn(12, transformer.config.cap_feat_dim, generator=g)],
        return_dict=False,
    )


FAMILY = Family(
    name="zimage", pipeline_class="ZImagePipeline", transformer_class="ZImageTransformer2DModel",
    build_pipeline=build_pipeline, pipeline_kwargs=pipeline_kwargs,
    transformer_inputs=transformer_inputs, latent_arg="x", timestep_arg="t", timestep_max=1.0,
    notes="The pipeline feeds t = 1 - sigma (0 = noise, 1 = clean, scaled by t_scale=1000 inside), so its "
          "timesteps rise while zoo.denoise's fall; the range is the same.",
)
