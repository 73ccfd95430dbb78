"""``enable_cache(parallelism_config=..., attention_backend=...)``: cache-dit's parallelism and attention
options mapped onto diffusers' own machinery. ``ulysses_size`` / ``ring_size`` become diffusers'
``ContextParallelConfig`` (Ulysses / ring attention over ``torch.distributed``), ``tp_size`` its
``TensorParallelConfig`` (the model's ``_tp_plan``), applied with ``transformer.enable_parallelism``;
``attention_backend`` is diffusers' ``set_attention_backend``. The cache then finds the sequence's
process group from the graph's collectives as for any context-parallel model (passes/parallel.py)."""
from __future__ import annotations

import contextlib

import torch

from ..config import ParallelismBackend, ParallelismConfig
from ..errors import ConfigError

# cache-dit's own attention kernels (its registry), which diffusers does not have.
CACHE_DIT_ONLY_BACKENDS = ("sage3", "_sdpa_cudnn", "ffpa", "ffpa_fp8", "ffpa_fp4", "ffpa_fp8_per_block", "_npu_fia",
                           "_mindiesd_laser")


def attention_backends() -> tuple[str, ...]:
    """The names diffusers' ``set_attention_backend`` takes (which of them run depends on the machine)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(b.value for b in AttentionBackendName)


def set_attention_backend(transformer: torch.nn.Module, attention_backend: str | None) -> None:
    """cache-dit's ``set_attn_backend`` for one transformer: diffusers' ``set_attention_backend``.

    Raises:
        ConfigError: an unknown or cache-dit-only backend name, a module that is not a diffusers model, or
            a backend diffusers cannot use here (the message carries diffusers' reason).
    """
    if attention_backend is None:
        return
    allowed = attention_backends()
    if attention_backend not in allowed:
        why = " (a cache-dit kernel, not one of diffusers')" if attention_backend in CACHE_DIT_ONLY_BACKENDS else ""
        raise ConfigError(f"attention_backend must be one of diffusers' backends {', '.join(allowed)}, got "
                          f"{attention_backend!r}{why}")
    if not callable(getattr(transformer, "set_attention_backend", None)):
        raise ConfigError(f"attention_backend={attention_backend!r}: {type(transformer).__name__} is not a diffusers "
                          "model (no set_attention_backend)")
    try:
        transformer.set_attention_backend(attention_backend)
    except Exception as e:  # noqa: BLE001 - diffusers' reasons vary (a missing kernel package, the device)
        raise ConfigError(f"attention_backend={attention_backend!r} cannot be used for {type(transformer).__name__}: "
                          f"{type(e).__name__}: {e}") from e


def _diffusers_config(config: ParallelismConfig):
    from diffusers import ContextParallelConfig, TensorParallelConfig

    if config.cp_enabled():
        # diffusers rotates ring shards with all-gather only; cache-dit's "p2p" default rotates them one hop
        # at a time. Both hand every rank the same keys and values, so the attention is the same.
        return ContextParallelConfig(ulysses_degree=config.ulysses_size or 1, ring_degree=config.ring_size or 1,
                                     convert_to_fp32=bool(config.ring_convert_to_fp32), rotate_method="allgather",
                                     ulysses_anything=bool(config.ulysses_anything))
    return TensorParallelConfig(tp_degree=config.tp_size)


@contextlib.contextmanager
def _cpu_device_index():
    """diffusers 0.42.1 places each rank on ``rank % torch.accelerator.device_count()``, which is a
    division by zero on a machine without an accelerator (count 0); the CPU is one device there. Scoped
    to the ``enable_parallelism`` call; torch is left as it was."""
    if torch._C._get_accelerator().type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def enable_parallelism(transformer: torch.nn.Module, config: ParallelismConfig) -> torch.nn.Module:
    """Shard ``transformer`` over this process's ``torch.distributed`` world as ``config`` says.

    Raises:
        ConfigError: torch.distributed is not initialized or its world does not match the sizes, the
            model has no context-parallel (tensor-parallel) plan, or diffusers refuses the layout.
    """
    import torch.distributed as dist

    if getattr(transformer, "_is_parallelized", False):  # cache-dit skips a second enable the same way
        return transformer
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("parallelism_config needs torch.distributed initialized on every rank (run the script "
                          "with torchrun and call torch.distributed.init_process_group first)")
    if config.world_size() != dist.get_world_size():
        raise ConfigError(f"parallelism_config spans {config.world_size()} ranks ({config.strify()}) but "
                          f"torch.distributed has {dist.get_world_size()}")
    plan = "_cp_plan" if config.backend is ParallelismBackend.CACHE_DIT else "_tp_plan"
    if getattr(transformer, plan, None) is None and not (plan == "_cp_plan" and config.cp_plan is not None):
        what = "context" if plan == "_cp_plan" else "tensor"
        raise ConfigError(f"parallelism_config: {type(transformer).__name__} has no {what}-parallel plan in diffusers "
                          f"({plan}){'; pass cp_plan=' if what == 'context' else ''}")
    if config.tp_enabled():
        from diffusers.hooks.tensor_parallel import _SUPPORTED_TP_DEVICES as supported

        device = torch._C._get_accelerator().type
        if device not in supported:  # checked before diffusers records a half-applied config on the model
            raise ConfigError(f"parallelism_config.tp_size: diffusers' tensor parallelism runs on {list(supported)}, "
                              f"not on {device!r}; use ulysses_size / ring_size (context parallelism) here")
    backend = config.attention_backend
    if backend is None and config.cp_enabled():
        backend = "native"  # cache-dit's default for context parallelism
    set_attention_backend(transformer, backend)
    try:
        with _cpu_device_index():
            transformer.enable_parallelism(config=_diffusers_config(config), cp_plan=config.cp_plan)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"parallelism_config={config.strify(details=True)}: diffusers refuses it for "
                          f"{type(transformer).__name__}: {e}") from e
    transformer._is_parallelized, transformer._parallelism_config = True, config
    return transformer
