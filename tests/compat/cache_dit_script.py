"""A cache-dit 1.5.3 script as its users write it, with ``import cache_dit`` replaced by
``import cachedit_fx as cache_dit`` and nothing else: run it under ``torchrun --nproc_per_node 2`` (gloo)
for Ulysses-2, or with plain ``python`` for one process. The configs come from a cache-dit YAML file
(``load_configs``) or are written out (``QuantizeConfig``, ``ParallelismConfig``, ``attention_backend``).

    python cache_dit_script.py CONFIG.yaml|written OUT_DIR [COLLECTIVE_TIMEOUT_S]

Each rank saves its image, cached steps and what it found on the transformer to OUT_DIR/rank<r>.pt."""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

import cachedit_fx as cache_dit
from cachedit_fx import zoo
from cachedit_fx.install.hook import cache_hook

CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.45, max_warmup_steps=2)


def main(config: str, out_dir: str, timeout_s: float = 120.0) -> None:
    torch.set_num_threads(1)
    parallel = "RANK" in os.environ  # started by torchrun
    if parallel:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    pipe = zoo.build_pipeline("flux")
    if config != "written":
        cache_dit.enable_cache(pipe, **cache_dit.load_configs(config), compile=False)
    else:
        cache_dit.enable_cache(
            pipe, cache_config=cache_dit.DBCacheConfig(**CACHE),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1),
            parallelism_config=cache_dit.ParallelismConfig(ulysses_size=2) if parallel else None,
            attention_backend="native", quantize_config=cache_dit.QuantizeConfig(quant_type="int8_weight_only"),
            compile=False)  # cache-dit ignores keywords it does not know; here: no Inductor compile
    image = pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=8, max_sequence_length=32,
                 guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    stats = cache_dit.summary(pipe, logging=False)
    weight = pipe.transformer.transformer_blocks[1].attn.to_q.weight
    rank = dist.get_rank() if parallel else 0
    torch.save(dict(image=image, cached=[s.cached_steps for s in stats], quantized=type(weight).__name__,
                    sharded=pipe.transformer._parallel_config is not None,
                    graphs=len(cache_hook(pipe.transformer).handle.graphs),  # what the test checks
                    backend=str(pipe.transformer.transformer_blocks[1].attn.processor._attention_backend)),
               os.path.join(out_dir, f"rank{rank}.pt"))
    if parallel:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(float, sys.argv[3:]))
