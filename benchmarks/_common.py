"""Shared helpers for the benchmark scripts: the medium random Flux model, timing, tables, JSON."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Medium random Flux: 2 double + 6 single blocks, dim 128 (2 heads x 64), 576 image + 32 text tokens
# (1024 tokens / dim 256 took 0.6-1.1 s a step on the shared 2-core CPU; this is ~0.2-0.4 s).
MEDIUM = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6, attention_head_dim=64,
              num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24])
MEDIUM_SIDE, MEDIUM_TXT = 24, 32


def parse_args(name: str, extra=None):
    p = argparse.ArgumentParser(description=f"cachedit-fx benchmark: {name}")
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats, inner aot_eager (smoke test)")
    p.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core box, 2 threads wait on each "
                        "other whenever another job holds a core, and medians swing by 10x)")
    if extra:
        extra(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    return args


def build_model(quick: bool, seed: int = 0):
    """(transformer, inputs). Quick: the zoo's tiny Flux; full: the medium model above."""
    if quick:
        from cachedit_fx.testing import zoo

        t, inputs = zoo.build_transformer("flux", seed)
        return t.eval(), inputs, {"model": "zoo tiny flux (4+4 blocks, dim 32, 64 tokens)"}
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    t = FluxTransformer2DModel(**MEDIUM).eval()
    g = torch.Generator().manual_seed(seed)
    side, txt = MEDIUM_SIDE, MEDIUM_TXT
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, MEDIUM["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, txt, MEDIUM["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, MEDIUM["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([1.0]), img_ids=img_ids.float(), txt_ids=torch.zeros(txt, 3), return_dict=False)
    desc = (f"random FluxTransformer2DModel {MEDIUM['num_layers']} double + {MEDIUM['num_single_layers']} single "
            f"blocks, dim {MEDIUM['attention_head_dim'] * MEDIUM['num_attention_heads']}, "
            f"{side * side} image + {txt} text tokens, fp32")
    return t, inputs, {"model": desc}


def first_block_only(model):
    """A copy that keeps only the first double block (the ideal F1B0 cached step: Fn only)."""
    m = copy.deepcopy(model)
    m.transformer_blocks = torch.nn.ModuleList(list(m.transformer_blocks)[:1])
    m.single_transformer_blocks = torch.nn.ModuleList()
    return m


def first_block_cache(model, threshold: float) -> list[bool]:
    """Apply diffusers' FirstBlockCache to ``model`` in place; returns the list its head-block hook
    appends each call's decision to (True: the remaining blocks ran, False: cached)."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks import first_block_cache as fbc

    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
    if not getattr(fbc.FBCHeadBlockHook, "_bench_wrapped", False):
        orig = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

        def counted(hook, r):
            out = orig(hook, r)
            getattr(hook, "_bench_log", []).append(out)
            return out

        fbc.FBCHeadBlockHook._should_compute_remaining_blocks = counted
        fbc.FBCHeadBlockHook._bench_wrapped = True
    decisions: list[bool] = []
    for mod in model.modules():
        reg = getattr(mod, "_diffusers_hook", None)
        if reg is not None:
            for h in reg.hooks.values():
                if isinstance(h, fbc.FBCHeadBlockHook):
                    h._bench_log = decisions
    return decisions


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in load] if load else None}


def time_interleaved(fns: dict, repeats: int, inner: int = 1) -> dict:
    """Median seconds per call of each fn, calls interleaved (A B C A B C ...) so load drift hits all."""
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "n": len(v)} for k, v in samples.items()}


def table(headers, rows) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in headers) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, args, payload: dict) -> Path:
    out = Path(args.out) if args.out else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{name}.quick.json" if args.quick and not args.out else f"{name}.json")
    payload = {"benchmark": name, "quick": bool(args.quick), "machine": machine(),
               "command": f"python benchmarks/{name}.py" + (" --quick" if args.quick else ""), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")
    return path
