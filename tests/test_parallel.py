"""Context parallelism (diffusers' enable_parallelism) on two gloo ranks spawned by the test: every
rank takes the single-process decisions (the diff's sums are all-reduced inside the graph), one graph
and no break per rank, a second request with other numbers compiles nothing, ranks given different
configs fail with a clear error, and a collective timeout turns a hang into a failure."""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.45, max_warmup_steps=2)
SECOND = dict(num_inference_steps=6, residual_diff_threshold=0.55)  # the second request's numbers
STEPS = 8
TIMEOUT_S = 60  # a collective that waits longer fails the rank


def _scenarios():
    """name -> (how the cache is installed, which install comes first, ContextParallelConfig kwargs).
    Ring attention needs an attention backend that returns the log-sum-exp (flash, cuDNN: GPU only in
    diffusers 0.42.1; "native" refuses), so on CPU only Ulysses runs."""
    return {
        "ulysses, parallel first": ("enable_cache", "cp_first", dict(ulysses_degree=2)),
        "ulysses, cache first": ("enable_cache", "cache_first", dict(ulysses_degree=2)),
        "backend": ("backend", "cp_first", dict(ulysses_degree=2)),
    }


def _install(transformer, how, order, cp):
    import cachedit_fx as cf
    from diffusers import ContextParallelConfig

    transformer.set_attention_backend("native")
    parallel = lambda: transformer.enable_parallelism(config=ContextParallelConfig(**cp))  # noqa: E731
    if order == "cp_first":
        parallel()
    if how == "backend":
        call = torch.compile(transformer, backend="cachedit", fullgraph=True, dynamic=False,
                             options=dict(cache_config=CACHE, inner="aot_eager"))
    else:
        cf.enable_cache(transformer, cache_config=CACHE, compile=False)
        call = transformer
    if order == "cache_first":
        parallel()
    return call


def _request(transformer, call, steps):
    import cachedit_fx as cf
    from cachedit_fx.testing import zoo

    inputs = zoo.build_transformer("flux")[1]
    with torch.no_grad():
        _, outs = zoo.denoise(transformer, "flux", inputs, num_steps=steps, call=call)
    rows = [r for r in cf.summary(transformer, details=True, logging=False) if r.unmatched is None]
    return [r.cached_steps for r in rows], outs[-1].numpy()


def _rank(rank: int, world: int, port: int, queue) -> None:
    """One rank: every scenario, then the inconsistent-config check; results go to ``queue``."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # diffusers picks the device as rank % torch.accelerator.device_count(), 0 on a CPU-only machine.
    torch.accelerator.device_count = lambda: 1
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        import cachedit_fx as cf
        from cachedit_fx.handle import handles_for
        from cachedit_fx.testing import zoo

        for name, (how, order, cp) in _scenarios().items():
            torch._dynamo.reset()
            transformer = zoo.build_transformer("flux")[0]
            call = _install(transformer, how, order, cp)
            first = _request(transformer, call, STEPS)
            graphs = len(handles_for(transformer)[-1].graphs)
            cf.refresh_context(transformer, **SECOND)
            second = _request(transformer, call, SECOND["num_inference_steps"])
            results[name] = dict(first=first, second=second, graphs=graphs,
                                 graphs_after=len(handles_for(transformer)[-1].graphs))
        torch._dynamo.reset()
        transformer = zoo.build_transformer("flux")[0]
        transformer.set_attention_backend("native")
        from diffusers import ContextParallelConfig

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        cf.enable_cache(transformer, cache_config=dict(CACHE, residual_diff_threshold=0.1 * (rank + 1)), compile=False)
        try:
            _request(transformer, transformer, 2)
            results["inconsistent"] = "no error"
        except cf.ConfigError as e:
            results["inconsistent"] = str(e)
        torch._dynamo.reset()
        transformer, inputs = zoo.build_transformer("flux")
        transformer.set_attention_backend("native")
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        try:
            cf.export(transformer, example_kwargs=inputs, cache_config=CACHE, path=os.devnull)
            results["export"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            results["export"] = f"{type(e).__name__}: {e}"
        queue.put((rank, results))
    except Exception:
        queue.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """Both ranks' results, each rank a spawned process."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=8 * TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, result in got.items():
        assert isinstance(result, dict), f"rank {rank} failed:\n{result}"
    return got


@pytest.fixture(scope="module")
def single():
    """The single-process cached runs with the same configs."""
    import cachedit_fx as cf
    from cachedit_fx.testing import zoo

    torch._dynamo.reset()
    transformer = zoo.build_transformer("flux")[0]
    cf.enable_cache(transformer, cache_config=CACHE, compile=False)
    first = _request(transformer, transformer, STEPS)
    cf.refresh_context(transformer, **SECOND)
    second = _request(transformer, transformer, SECOND["num_inference_steps"])
    cf.disable_cache(transformer)
    return first, second


@pytest.mark.parametrize("name", list(_scenarios()))
def test_ranks_decide_as_one_process(ranks, single, name):
    for request, (want_steps, want_out) in zip(("first", "second"), single):
        got = [ranks[r][name][request] for r in (0, 1)]
        assert got[0][0] == got[1][0] == want_steps, (name, request, got[0][0], got[1][0], want_steps)
        assert any(want_steps) and not all(len(s) == len(range(2, STEPS)) for s in want_steps), want_steps
        for steps, out in got:
            torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(want_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(_scenarios()))
def test_one_graph_per_rank_and_none_for_the_second_request(ranks, name):
    for r in (0, 1):
        assert ranks[r][name]["graphs"] == 1 and ranks[r][name]["graphs_after"] == 1, ranks[r][name]


def test_ranks_with_different_configs_fail_clearly(ranks):
    for r in (0, 1):
        message = ranks[r]["inconsistent"]
        assert "ranks disagree on cache_config.residual_diff_threshold" in message, message


def test_export_of_a_context_parallel_transformer_says_why_not(ranks):
    for r in (0, 1):
        message = ranks[r]["export"]
        assert message.startswith("ExportError") and "context-parallel" in message, message
