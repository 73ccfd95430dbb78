"""Context parallelism: one cached request on 2 gloo ranks (diffusers' Ulysses-2) against 1 process.

    python benchmarks/parallel.py [--quick] [--inductor]

Both runs cache the same model with the same config (F1B0, enable_cache; the eager inner compiler,
or Inductor with ``--inductor``). The table gives
the cached steps of each rank and of the single process (they must be equal: the diff is all-reduced
inside the graph), the largest output difference, and the median request time. On a 2-core CPU the two
ranks share the cores and gloo moves the all-to-alls through loopback TCP, so the time column shows
the cost of the collectives, not a speedup: a GPU run is the speed measurement.
"""
from __future__ import annotations

import datetime
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from _common import build_model, parse_args, table, write_json

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.45, max_warmup_steps=2)


def request(transformer, inputs, steps: int):
    """(seconds, cached steps, final latent) of one request."""
    import cachedit_fx as cf
    from cachedit_fx import zoo

    started = time.perf_counter()
    with torch.no_grad():
        latent, _ = zoo.denoise(transformer, "flux", inputs, num_steps=steps)
    seconds = time.perf_counter() - started
    rows = [r for r in cf.summary(transformer, details=True, logging=False) if r.unmatched is None]
    return seconds, rows[0].cached_steps, latent


def run(transformer, inputs, steps: int, repeats: int, inductor: bool):
    import cachedit_fx as cf

    cf.enable_cache(transformer, cache_config=CACHE, compile=inductor)
    request(transformer, inputs, steps)  # compile
    times, cached, latent = [], None, None
    for _ in range(repeats):
        seconds, cached, latent = request(transformer, inputs, steps)
        times.append(seconds)
    return statistics.median(times), cached, latent.numpy()


def rank_main(rank: int, port: int, quick: bool, steps: int, repeats: int, inductor: bool, queue) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1  # diffusers picks rank % device_count(): 0 without a GPU
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    transformer, inputs, _ = build_model(quick)
    transformer.set_attention_backend("native")
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    queue.put((rank, run(transformer, inputs, steps, repeats, inductor)))
    dist.destroy_process_group()


def main():
    args = parse_args("parallel", lambda p: p.add_argument("--inductor", action="store_true",
                                                           help="compile with Inductor (default: the eager inner compiler)"))
    steps, repeats = (8, 2) if args.quick else (28, 5)
    transformer, inputs, info = build_model(args.quick)
    single = run(transformer, inputs, steps, repeats, args.inductor)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(r, port, args.quick, steps, repeats, args.inductor,
                                                                queue)) for r in range(2)]
    for p in procs:
        p.start()
    ranks = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    rows = [{"run": "1 process", "cached steps": len(single[1]), "same steps as 1 process": True,
             "max abs diff vs 1 process": 0.0, "median request s": single[0], "ratio vs 1 process": 1.0}]
    for r in (0, 1):
        seconds, cached, latent = ranks[r]
        rows.append({"run": f"2 ranks, rank {r}", "cached steps": len(cached), "same steps as 1 process": cached == single[1],
                     "max abs diff vs 1 process": float(abs(torch.from_numpy(latent) - torch.from_numpy(single[2])).max()),
                     "median request s": seconds, "ratio vs 1 process": seconds / single[0]})
    heads = ["run", "cached steps", "same steps as 1 process", "max abs diff vs 1 process", "median request s",
             "ratio vs 1 process"]
    inner = "Inductor" if args.inductor else "eager inner"
    print(f"## parallel ({info['model']}; {steps} steps, F1B0 thr {CACHE['residual_diff_threshold']}, {inner}, "
          f"Ulysses-2 on gloo; 2 CPU cores shared by the ranks: correctness, not speed)\n")
    print(table(heads, rows))
    write_json("parallel", args, {"info": info, "inner": inner, "steps": steps, "repeats": repeats, "rows": rows})
    return 0 if all(r["same steps as 1 process"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
