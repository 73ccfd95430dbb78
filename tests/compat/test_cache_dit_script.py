"""A cache-dit 1.5.3 script using its whole ``enable_cache``: ``load_configs`` (cache + TaylorSeer, Ulysses-2,
the attention backend, int8 quantization from one YAML file) and the same configs written out as
``QuantizeConfig`` / ``ParallelismConfig`` / ``attention_backend``, run unchanged after
``import cachedit_fx as cache_dit`` on 2 gloo ranks (torchrun's layout: one process per rank), against
the same script in one process without the parallelism. Every rank takes the single-process decisions
and draws its image; a collective timeout turns a hang into a failure.

cache-dit itself cannot be the reference here: it refuses quantization without CUDA and its
context-parallel planners need einops (``tests/compat/test_cache_dit.py`` compares quantized models
with cache-dit itself, quantized by torchao for both)."""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
pytest.importorskip("torchao", reason="torchao 0.18.0 (pip install 'cachedit-fx[quant]')")
pytest.importorskip("yaml", reason="PyYAML (load_configs reads YAML)")

TIMEOUT_S = 120
CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.45, max_warmup_steps=2)
YAML = """\
cache_config:
  Fn_compute_blocks: 1
  Bn_compute_blocks: 0
  residual_diff_threshold: 0.45
  max_warmup_steps: 2
  enable_taylorseer: true
  taylorseer_order: 1
{parallelism}attention_backend: native
quantize_config:
  quant_type: int8_weight_only
"""
ULYSSES = "parallelism_config:\n  ulysses_size: 2\n"


def cache_dit_script(pipe, config_path: str | None, parallel: bool):
    """What a cache-dit user writes (``import cache_dit`` became the first line); with ``config_path`` the
    configs come from the YAML file, else they are written out."""
    import cachedit_fx as cache_dit

    if config_path is not None:
        cache_dit.enable_cache(pipe, **cache_dit.load_configs(config_path), compile=False)
    else:
        cache_dit.enable_cache(
            pipe, cache_config=cache_dit.DBCacheConfig(**CACHE),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1),
            parallelism_config=cache_dit.ParallelismConfig(ulysses_size=2) if parallel else None,
            attention_backend="native", quantize_config=cache_dit.QuantizeConfig(quant_type="int8_weight_only"),
            compile=False)  # cache-dit ignores keywords it does not know; ours: no Inductor compile in the test
    image = pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=8, max_sequence_length=32,
                 guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    stats = cache_dit.summary(pipe, logging=False)
    return image, stats


def _runs(directory: str, parallel: bool) -> dict:
    """Both spellings of the script, each on a fresh zoo Flux pipeline: their cached steps, whether the
    transformer is quantized and sharded, and the image."""
    from cachedit_fx import zoo
    from cachedit_fx.install.hook import cache_hook

    path = os.path.join(directory, "parallel.yaml" if parallel else "single.yaml")
    out = {}
    for spelling, config_path in (("load_configs", path), ("written out", None)):
        pipe = zoo.build_pipeline("flux")
        image, stats = cache_dit_script(pipe, config_path, parallel)
        weight = pipe.transformer.transformer_blocks[1].attn.to_q.weight
        out[spelling] = dict(cached=[s.cached_steps for s in stats], quantized=type(weight).__name__,
                             sharded=pipe.transformer._parallel_config is not None,
                             graphs=len(cache_hook(pipe.transformer).handle.graphs), image=image.numpy())
    return out


def _process(rank: int, world: int, port: int, directory: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1  # diffusers picks rank % device_count(): 0 without a GPU
    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        queue.put((rank, _runs(directory, parallel=world > 1)))
    except Exception:
        queue.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, directory: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_process, args=(r, world, port, directory, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=6 * TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, result in got.items():
        assert isinstance(result, dict), f"rank {rank} of {world} failed:\n{result}"
    return got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the 2 ranks' results, the single process's), each run in a spawned process of its own."""
    directory = tmp_path_factory.mktemp("cache_dit_script")
    (directory / "parallel.yaml").write_text(YAML.format(parallelism=ULYSSES))
    (directory / "single.yaml").write_text(YAML.format(parallelism=""))
    return _spawn(2, str(directory)), _spawn(1, str(directory))[0]


@pytest.mark.parametrize("spelling", ["load_configs", "written out"])
def test_the_script_runs_unchanged_on_two_ranks_and_decides_as_one_process(runs, spelling):
    ranks, single = runs
    want = single[spelling]
    assert want["quantized"] == "Int8Tensor" and not want["sharded"] and want["graphs"] == 1
    assert want["cached"] and want["cached"][0] and len(want["cached"][0]) < 7, want["cached"]
    for rank in (0, 1):
        got = ranks[rank][spelling]
        assert got["quantized"] == "Int8Tensor" and got["sharded"] and got["graphs"] == 1, (rank, got)
        assert got["cached"] == want["cached"], (rank, got["cached"], want["cached"])
        torch.testing.assert_close(torch.from_numpy(got["image"]), torch.from_numpy(want["image"]),
                                   rtol=1e-5, atol=1e-5)


def test_both_spellings_are_one_config(runs):
    _, single = runs
    assert single["load_configs"]["cached"] == single["written out"]["cached"]
    torch.testing.assert_close(torch.from_numpy(single["load_configs"]["image"]),
                               torch.from_numpy(single["written out"]["image"]), rtol=0, atol=0)
