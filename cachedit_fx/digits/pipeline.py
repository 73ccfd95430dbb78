"""The digits pipeline: a class-conditioned tiny Flux transformer sampled with flow-matching Euler steps
and classifier-free guidance as two transformer calls per step (cond, then uncond), each inside
diffusers' ``cache_context`` so a cache keeps one state per branch."""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from . import data

OUTPUT_TYPES = ("pt", "np", "pil", "latent")


def build_transformer() -> FluxTransformer2DModel:
    """The untrained architecture: 2 double-stream + 6 single-stream blocks, width 64."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=data.CHANNELS, num_layers=2, num_single_layers=6, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=data.CONDITION_DIM, pooled_projection_dim=data.CONDITION_DIM,
        axes_dims_rope=[4, 6, 6])


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class DigitsPipeline(DiffusionPipeline):
    """Generates 8x8 digits of the given labels (0..9)."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: FluxTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _velocity(self, latents, cond, timestep, branch: str):
        t = timestep.expand(latents.shape[0]).to(latents.dtype) / 1000  # Flux's transformer scales by 1000
        with self.transformer.cache_context(branch):
            return self.transformer(hidden_states=latents, encoder_hidden_states=cond[:, None].to(latents.dtype),
                                    pooled_projections=cond.to(latents.dtype), timestep=t,
                                    img_ids=data.image_ids().to(latents.device),
                                    txt_ids=data.text_ids().to(latents.device), return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, labels, num_inference_steps: int = 28, guidance_scale: float = 2.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """
        Args:
            labels: the digits to draw, ints 0..9 (one image each).
            num_inference_steps: Euler steps from noise to image.
            guidance_scale: classifier-free guidance; above 1 each step calls the transformer twice.
            generator: seeds the starting noise.
            latents: starting noise ``(len(labels), 16, 4)`` instead of drawing it.
            output_type: "pt" ``(B, 1, 8, 8)`` in [0, 1], "np" ``(B, 8, 8, 1)``, "pil" grayscale images,
                or "latent" (the packed tokens).
        """
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= data.NUM_CLASSES:
            raise ValueError(f"labels must be a non-empty list of digits 0..{data.NUM_CLASSES - 1}, got {labels.tolist()}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        device, dtype = self._execution_device, self.transformer.dtype
        shape = (labels.numel(), data.TOKENS, data.CHANNELS)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None \
            else latents.to(device=device, dtype=dtype)
        cond = data.condition(labels).to(device)
        uncond = data.condition(torch.full_like(labels, data.NULL_CLASS)).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            velocity = self._velocity(latents, cond, t, "cond")
            if guidance_scale > 1:
                uncond_velocity = self._velocity(latents, uncond, t, "uncond")
                velocity = uncond_velocity + guidance_scale * (velocity - uncond_velocity)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = ((data.unpack(latents.float()) + 1) / 2).clamp(0, 1)[:, None]
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)
