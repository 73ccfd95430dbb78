"""cache-dit's ``set_compile_configs``: its global Dynamo and Inductor settings for generative models.

What they mean here: the Inductor settings apply to the Inductor compile of the cached graph (the one
graph enable_cache compiles, under the backend's own ``size_asserts=False``) and to every other
Inductor compile in the process; Dynamo's recompile limits apply to the user's own compiles, while
enable_cache's installs keep their own limit per transformer (``install.graph.MAX_GRAPHS``, one graph
per input shape). Nothing here is set implicitly: cache-dit does not either, and a raised recompile
limit hides recompiles. cache-dit's environment switches (``CACHE_DIT_FORCE_DISABLE_CUSTOM_COMPILE_CONFIG``,
``CACHE_DIT_EPILOGUE_PROLOGUE_FUSION``, ``CACHE_DIT_ENABLE_COMPILE_COMPUTE_COMM_OVERLAP``) are honoured.
"""
from __future__ import annotations

import os

import torch


def _env(name: str, default: str) -> bool:
    return bool(int(os.environ.get(name, default)))


def _dynamo(ulysses_anything: bool, capture_scalar_outputs, capture_dynamic_output_shape_ops) -> None:
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit, dynamo.accumulated_recompile_limit = 1024, 8192
    if capture_scalar_outputs is None and ulysses_anything:
        capture_scalar_outputs = True  # uneven Ulysses shards read sizes as scalars (torch >= 2.10)
    if capture_scalar_outputs is not None:
        dynamo.capture_scalar_outputs = capture_scalar_outputs
    if capture_dynamic_output_shape_ops is not None:
        dynamo.capture_dynamic_output_shape_ops = capture_dynamic_output_shape_ops


def _tuning(inductor, cuda_graphs: bool, epilogue_prologue_fusion: bool) -> None:
    inductor.max_fusion_size, inductor.max_pointwise_cat_inputs = 64, 8
    inductor.triton.cudagraphs, inductor.triton.use_block_ptr = cuda_graphs, False
    inductor.triton.codegen_upcast_to_fp32 = True
    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = inductor.coordinate_descent_check_all_directions = True
    inductor.epilogue_fusion = False
    if epilogue_prologue_fusion or _env("CACHE_DIT_EPILOGUE_PROLOGUE_FUSION", "0"):
        inductor.epilogue_fusion = inductor.prologue_fusion = inductor.epilogue_fusion_first = True
    inductor.dce = True


def set_compile_configs(descent_tuning: bool = True, cuda_graphs: bool = False,
                        force_disable_compile_caches: bool = False, fx_graph_cache: bool = True,
                        fx_graph_remote_cache: bool = False, autotune_local_cache: bool = False,
                        use_fast_math: bool = False, compute_comm_overlap: bool = True, ulysses_anything: bool = False,
                        capture_scalar_outputs: bool | None = None,
                        capture_dynamic_output_shape_ops: bool | None = None,
                        cutedsl_enable_autotuning: bool | None = None, **kwargs) -> None:
    """Set cache-dit 1.5.3's global compile settings (same arguments, same values).

    Args:
        descent_tuning: Inductor's coordinate-descent tuning and cache-dit's fusion limits (longer compiles).
        cuda_graphs: Inductor's CUDA graphs (GPU only; not verified with the cond inside the graph).
        force_disable_compile_caches, fx_graph_cache, fx_graph_remote_cache, autotune_local_cache: Inductor's caches.
        use_fast_math: Inductor's fast-math flag.
        compute_comm_overlap: reorder for compute/communication overlap when torch.distributed runs.
        ulysses_anything, capture_scalar_outputs, capture_dynamic_output_shape_ops: Dynamo's scalar captures.
        cutedsl_enable_autotuning: Inductor's CuTe DSL autotuning.
        kwargs: ``epilogue_prologue_fusion=True`` turns those fusions on (cache-dit's extra switch).
    """
    import torch._inductor.config as inductor

    _dynamo(ulysses_anything, capture_scalar_outputs, capture_dynamic_output_shape_ops)
    inductor.fx_graph_cache, inductor.fx_graph_remote_cache = fx_graph_cache, fx_graph_remote_cache
    inductor.autotune_local_cache = autotune_local_cache
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        inductor.reorder_for_compute_comm_overlap = compute_comm_overlap and \
            _env("CACHE_DIT_ENABLE_COMPILE_COMPUTE_COMM_OVERLAP", "1")
        if inductor.reorder_for_compute_comm_overlap:
            name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
            inductor.intra_node_bw = 64 if "L20" in name else 300
    if cutedsl_enable_autotuning is not None:
        inductor.cutedsl_enable_autotuning = cutedsl_enable_autotuning
    if not descent_tuning or _env("CACHE_DIT_FORCE_DISABLE_CUSTOM_COMPILE_CONFIG", "0"):
        return
    _tuning(inductor, cuda_graphs, kwargs.get("epilogue_prologue_fusion", False))
    if force_disable_compile_caches:
        inductor.force_disable_caches = True
        inductor.fx_graph_cache = inductor.fx_graph_remote_cache = inductor.autotune_local_cache = False
    inductor.use_fast_math = use_fast_math
