"""Context parallelism (diffusers' enable_parallelism) on two gloo ranks spawned by the test: Ulysses
and ring, Flux and Wan with separate CFG, the graph pass (either install order, and the bare backend)
and the eager cache. Every rank takes the single-process decisions (the diff's sums are all-reduced),
one graph and no break per rank, a second request with other numbers compiles nothing, ranks given
different configs fail with a clear error, and a collective timeout turns a hang into a failure."""
from __future__ import annotations

import datetime
import os
import socket
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.dynamo import compile_own

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.45, max_warmup_steps=2)
WAN_CACHE = dict(Fn_compute_blocks=1, residual_diff_threshold=0.1, max_warmup_steps=2, enable_separate_cfg=True)
SECOND = dict(num_inference_steps=6, residual_diff_threshold=0.55)  # the second request's numbers
STEPS = 8
TIMEOUT_S = 60  # a collective that waits longer fails the rank


@dataclass(frozen=True)
class Scenario:
    how: str = "enable_cache"  # enable_cache | eager (the eager cache) | backend
    order: str = "cp_first"  # cp_first | cache_first: which of enable_parallelism / the cache comes first
    cp: tuple = (("ulysses_degree", 2),)  # ContextParallelConfig kwargs
    family: str = "flux"
    lse: bool = False  # attention that returns the log-sum-exp, as ring attention needs

    @property
    def cache(self) -> dict:
        return WAN_CACHE if self.family == "wan" else CACHE


SCENARIOS = {
    "ulysses, parallel first": Scenario(),
    "ulysses, cache first": Scenario(order="cache_first"),
    "backend": Scenario(how="backend"),
    "eager cache": Scenario(how="eager"),
    "ring": Scenario(cp=(("ring_degree", 2),), lse=True),
    "wan, separate CFG": Scenario(family="wan"),
    "wan, separate CFG, eager cache": Scenario(family="wan", how="eager"),
}


def _lse_attention(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """Attention that also returns the log-sum-exp (B, S, H), which diffusers' ring attention merges the
    ring's partial results with. diffusers 0.42.1 has it only in GPU backends (flash, cuDNN); its "native"
    CPU backend refuses, so the ring scenario's ranks stand this in for the native op."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3)
    return (out, scores.logsumexp(-1).permute(0, 2, 1)) if return_lse else out


def _install(transformer, sc: Scenario):
    import cachedit_fx as cf
    from diffusers import ContextParallelConfig

    transformer.set_attention_backend("native")
    parallel = lambda: transformer.enable_parallelism(config=ContextParallelConfig(**dict(sc.cp)))  # noqa: E731
    if sc.order == "cp_first":
        parallel()
    if sc.how == "backend":
        call = compile_own(transformer, backend="cachedit", fullgraph=True, dynamic=False,
                           options=dict(cache_config=sc.cache, inner="aot_eager"))
    else:
        cf.enable_cache(transformer, cache_config=sc.cache, compile=False, eager=sc.how == "eager")
        call = transformer
    if sc.order == "cache_first":
        parallel()
    return call


def _request(transformer, call, steps, family="flux"):
    import cachedit_fx as cf
    from cachedit_fx import zoo

    fam = zoo.get(family)
    inputs = zoo.build_transformer(family)[1]
    uncond = fam.uncond_inputs(transformer, 0) if family == "wan" else None
    with torch.no_grad():
        _, outs = zoo.denoise(transformer, family, inputs, num_steps=steps, uncond=uncond, call=call)
    rows = [r for r in cf.summary(transformer, details=True, logging=False) if r.unmatched is None]
    return [r.cached_steps for r in rows], outs[-1].numpy()


def _graphs(transformer) -> int:
    """Graphs compiled over the transformer's weights (none for the eager cache, which compiles nothing)."""
    from cachedit_fx.runtime.handle import handles_for

    handles = handles_for(transformer)
    return len(handles[-1].graphs) if handles else 0


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
        from cachedit_fx import zoo

        import diffusers.models.attention_dispatch as dispatch

        native = dispatch._native_attention_forward_op
        alive = []  # every scenario's model stays alive: a freed one's weight storage, reused by the next
        # model, would make summary() match the old install's graphs too (handles are found by storage)
        for name, sc in SCENARIOS.items():
            dispatch._native_attention_forward_op = _lse_attention if sc.lse else native
            transformer = zoo.build_transformer(sc.family)[0]
            alive.append(transformer)
            call = _install(transformer, sc)
            first = _request(transformer, call, STEPS, sc.family)
            graphs = _graphs(transformer)
            cf.refresh_context(transformer, **SECOND)
            second = _request(transformer, call, SECOND["num_inference_steps"], sc.family)
            results[name] = dict(first=first, second=second, graphs=graphs,
                                 graphs_after=_graphs(transformer))
        dispatch._native_attention_forward_op = native
        transformer = zoo.build_transformer("flux")[0]
        _install(transformer, Scenario(cp=(("ring_degree", 2),)))
        try:
            _request(transformer, transformer, 2)
            results["ring, native attention"] = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            results["ring, native attention"] = f"{type(e).__name__}: {e}"
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
    """The single-process cached runs with the same configs, per family."""
    import cachedit_fx as cf
    from cachedit_fx import zoo

    runs = {}
    for family, eager in sorted({(sc.family, sc.how == "eager") for sc in SCENARIOS.values()}):
        transformer = zoo.build_transformer(family)[0]
        cf.enable_cache(transformer, cache_config=Scenario(family=family).cache, compile=False, eager=eager)
        first = _request(transformer, transformer, STEPS, family)
        cf.refresh_context(transformer, **SECOND)
        second = _request(transformer, transformer, SECOND["num_inference_steps"], family)
        cf.disable_cache(transformer)
        runs[family, eager] = first, second
    return runs


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_decide_as_one_process(ranks, single, name):
    sc = SCENARIOS[name]
    for request, (want_steps, want_out) in zip(("first", "second"), single[sc.family, sc.how == "eager"]):
        got = [ranks[r][name][request] for r in (0, 1)]
        assert got[0][0] == got[1][0] == want_steps, (name, request, got[0][0], got[1][0], want_steps)
        assert any(want_steps) and not all(len(s) == len(range(2, STEPS)) for s in want_steps), want_steps
        for steps, out in got:
            torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(want_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, sc in SCENARIOS.items() if sc.how != "eager"])
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


def test_ring_attention_without_a_log_sum_exp_raises_the_models_error_on_every_rank(ranks):
    for r in (0, 1):
        message = ranks[r]["ring, native attention"]
        assert message.startswith("ValueError") and "return_lse" in message, message
