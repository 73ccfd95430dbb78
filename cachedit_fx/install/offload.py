"""Weight-offload hooks inside a transformer: diffusers' group offloading and accelerate's sequential
CPU offload move a block's weights on and off the device in every call of it, host code a compiled
graph cannot hold. The eager cache serves such models: a cached step does not call the skipped
blocks, so their weights stay where they are. (Model-level CPU offload hooks only the transformer
itself and compiles as usual.)"""
from __future__ import annotations

import torch

_DIFFUSERS_OFFLOAD_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker")


def offload_hooks(module: torch.nn.Module) -> str | None:
    """What offloads weights inside ``module`` below its top level, in words; None when nothing does."""
    for name, sub in module.named_modules():
        if sub is module:
            continue
        registry = getattr(sub, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", {}) or {}
        if any(h in hooks for h in _DIFFUSERS_OFFLOAD_HOOKS):
            return f"diffusers group offloading hooks (on {name} and others)"
        if hasattr(sub, "_hf_hook"):
            return f"accelerate offload hooks (on {name} and others; sequential CPU offload)"
    return None
