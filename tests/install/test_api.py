"""One-line pipeline API: enable_cache / disable_cache / summary / strify / reset / supported_pipelines
on the offline zoo's diffusers pipelines (tiny random models, CPU, compile=False unless stated)."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import cachedit_fx as cf
from cachedit_fx import zoo
from cachedit_fx.tools import metrics

STEPS = 8
BASE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.8, max_warmup_steps=2)

# Per-family thresholds. AuraFlow's tiny random model: the relative L1 change of block 0's residual between
# steps is 0.97-2.2 (checked by hand with a forward hook on joint_transformer_blocks[0], equal to the
# diffs summary reports), so nothing in 0.5-0.95 ever caches; that is the model, not the pass.
THRESHOLDS = {"auraflow": 1.5}

# HiDream (MoE routing with a host sync) and Mochi (attention dropping padded tokens with torch.nonzero)
# break the graph inside every block; enable_cache makes those submodules islands (islands.py). HiDream's
# tiny random model caches at the base threshold: with its MoE feed-forwards as islands, block 0's
# residual diff between steps is 0.24-0.63 (summary's diffs), under 0.8 from step 2 on.

SEPARATE_CFG = ("wan", "cogview4", "qwenimage", "chroma", "lumina2")


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR over the reference's own value range."""
    a, b = out.detach().float().cpu().numpy(), ref.detach().float().cpu().numpy()
    return metrics.psnr(b, a, data_range=max(float(b.max() - b.min()), 1e-8))


def config(name: str | None = None, **changes) -> dict:
    return {**BASE, "residual_diff_threshold": THRESHOLDS.get(name, BASE["residual_diff_threshold"]), **changes}


def run(pipe, name, **kw):
    return zoo.run_pipeline(pipe, name, num_inference_steps=STEPS, seed=0, **kw)


def cached_runs(pipe, name, **cache_changes):
    """Enable with ``cache_changes``, run once; returns (output, summary rows, cachedit warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cf.enable_cache(pipe, cache_config=config(name, **cache_changes), compile=False)
        out = run(pipe, name)
        rows = cf.summary(pipe, details=True)
    return out, rows, [str(w.message) for w in caught if "cachedit" in str(w.message)]


def chain_rows(stats):
    return [s for s in stats if s.unmatched is None]


def per_step_cached(stats) -> list[bool]:
    rs = chain_rows(stats)
    assert len(rs) == 1, rs
    return [i in rs[0].cached_steps for i in range(rs[0].steps)]


@pytest.fixture(scope="module")
def flux():
    """One Flux pipeline and its uncached output, shared; each test leaves it uncached."""
    pipe = zoo.build_pipeline("flux")
    ref = run(pipe, "flux")
    yield pipe, ref
    cf.disable_cache(pipe)


@dataclass
class FamilyRun:
    ref: torch.Tensor
    out: torch.Tensor
    again: torch.Tensor
    restored: torch.Tensor
    rows: list
    warned: list

    @property
    def cached(self) -> int:
        return sum(len(r.cached_steps) + len(r.cfg_cached_steps) for r in chain_rows(self.rows))


@functools.lru_cache(maxsize=None)
def family_run(name: str) -> FamilyRun:
    """Uncached, cached (twice) and disabled runs of one family; shared by the tests that read them."""
    pipe = zoo.build_pipeline(name)
    ref = run(pipe, name)
    try:
        out, rows, warned = cached_runs(pipe, name)
        again = run(pipe, name)
    finally:
        cf.disable_cache(pipe)
    return FamilyRun(ref, out, again, run(pipe, name), rows, warned)


# PSNR of the cached image against the uncached one, in dB: what each family measured (random weights, the
# family's config in zoo) less 3 dB. A drop below the floor means the cached steps reuse a wrong residual.
PSNR_FLOOR = {
    "flux": 43,
    "sd3": 40,
    "qwenimage": 51,
    "wan": 37,
    "cogvideox": 35,
    "pixart": 77,
    "sana": 36,
    "hunyuanvideo": 45,
    "ltx": 47,
    "dit": 11,
    "cogview4": 47,
    "lumina2": 24,
    "auraflow": 21,
    "chroma": 27,
    "hidream": 38,
    "mochi": 28,
    "allegro": 13,
    "zimage": 32,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.FAMILY_NAMES)
def test_family_caches_and_disable_restores(name):
    r = family_run(name)
    value = psnr(r.out, r.ref)
    print(f"{name}: cached {r.cached} steps ({[(x.cached_steps, x.cfg_cached_steps) for x in r.rows]}), "
          f"PSNR {value:.2f} dB")
    assert r.cached > 0, f"{name}: no cached step; summary {r.rows}; warnings {r.warned}"
    assert not torch.equal(r.out, r.ref), f"{name}: cached steps but the output equals the uncached one"
    assert np.isfinite(value) and value >= PSNR_FLOOR[name], f"{name}: PSNR {value:.2f} dB < {PSNR_FLOOR[name]} dB"
    assert torch.isfinite(r.out.float()).all()
    assert torch.equal(r.out, r.again), f"{name}: a second call differs (state not reset per request)"
    assert torch.equal(r.restored, r.ref), f"{name}: disable_cache did not restore the uncached output"


@pytest.mark.slow
@pytest.mark.parametrize("name", SEPARATE_CFG)
def test_separate_cfg_has_two_branches(name):
    assert zoo.get(name).separate_cfg
    r = family_run(name)
    # Two state sets: branches 0 and 1 of one graph (cached_steps / cfg_cached_steps), or (cond and
    # uncond texts of different lengths compile to two graphs; a graph after a break may not see the
    # timestep) one per graph.
    used = [(steps, diffs, cached) for x in chain_rows(r.rows)
            for steps, diffs, cached in ((x.steps, x.residual_diffs, x.cached_steps),
                                         (x.cfg_steps, x.cfg_residual_diffs, x.cfg_cached_steps)) if steps > 0]
    assert len(used) == 2, f"{name}: {r.rows}; warnings {r.warned}"
    for steps, diffs, cached in used:
        assert steps == STEPS, r.rows
        assert diffs, f"{name}: a branch has no diffs: {r.rows}"
        assert all(0 <= int(k) < steps for k in diffs)
        assert len(cached) > 0, r.rows


@pytest.mark.slow
def test_twice_reset_summary_plot_strify(flux, tmp_path):
    """The same pipeline twice gives the same output and decisions; reset clears the logs; summary
    plots to a PNG; strify names the config."""
    pipe, _ = flux
    path = tmp_path / "d.png"
    try:
        out, first, _ = cached_runs(pipe, "flux")
        out2 = run(pipe, "flux")
        second = cf.summary(pipe, details=True, plot=path)
        tag = cf.strify(pipe)
        cf.reset(pipe)
        after_reset = cf.summary(pipe)
        out3 = run(pipe, "flux")
    finally:
        cf.disable_cache(pipe)
    assert torch.equal(out, out2) and torch.equal(out, out3)
    assert per_step_cached(first) == per_step_cached(second)
    assert sum(per_step_cached(second)) == 6
    assert all(r.steps == 0 and r.cached_steps == [] for r in chain_rows(after_reset)), after_reset
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tag.startswith("DBCache_F1B0"), tag
    assert tag.endswith("_S6"), tag


@pytest.mark.slow
def test_two_pipelines_interleaved_match_each_alone(flux):
    """Flux and SD3, and a second, separately built Flux with other settings: each alone, then run
    inside the first Flux's denoising loop (from its step callback) and in alternating calls."""
    a, _ = flux
    b, c = zoo.build_pipeline("sd3"), zoo.build_pipeline("flux")
    try:
        cf.enable_cache(a, cache_config=config("flux"), compile=False)
        cf.enable_cache(b, cache_config=config("sd3"), compile=False)
        cf.enable_cache(c, cache_config=config("flux", max_warmup_steps=4, max_cached_steps=2), compile=False)
        assert type(a) is not type(c) and type(a).__name__ == type(c).__name__ == "FluxPipeline"
        alone = {"a": run(a, "flux"), "b": run(b, "sd3"), "c": run(c, "flux")}
        assert not torch.equal(alone["a"], alone["c"]), "the two Flux configs should decide differently"

        inner = {}

        def during_a(pipe, i, t, kw):
            if i == 3:
                inner["b"] = run(b, "sd3")
                inner["c"] = run(c, "flux")
            return kw

        outer = run(a, "flux", callback_on_step_end=during_a)
        assert torch.equal(outer, alone["a"]), "flux changed when other pipelines ran inside its loop"
        assert torch.equal(inner["b"], alone["b"]), "sd3 changed when run inside flux's loop"
        assert torch.equal(inner["c"], alone["c"]), "the second flux changed when run inside the first's loop"
        for _ in range(2):
            assert torch.equal(run(c, "flux"), alone["c"])
            assert torch.equal(run(b, "sd3"), alone["b"])
            assert torch.equal(run(a, "flux"), alone["a"])
        assert sum(per_step_cached(cf.summary(c, details=True))) == 2
        assert cf.strify(a) != cf.strify(c)
    finally:
        for p in (a, b, c):
            cf.disable_cache(p)


@pytest.mark.slow
@pytest.mark.parametrize("limits, warmup", [(dict(max_cached_steps=2), 3), (dict(max_continuous_cached_steps=1), 1)])
def test_cache_limits_on_flux(flux, limits, warmup):
    """Without limits Flux caches 6 of 8 steps (2..7). max_cached_steps=2 caches exactly 2,
    max_continuous_cached_steps=1 never two in a row, and no step below the warmup W caches."""
    pipe, _ = flux
    try:
        _, rows, _ = cached_runs(pipe, "flux", max_warmup_steps=warmup, **limits)
    finally:
        cf.disable_cache(pipe)
    cached = per_step_cached(rows)
    gates = chain_rows(rows)[0].gates
    assert not any(cached[:warmup]) and gates[:warmup] == ["warmup"] * warmup, (cached, gates)
    if "max_cached_steps" in limits:
        assert sum(cached) == limits["max_cached_steps"], cached
    if "max_continuous_cached_steps" in limits:
        assert sum(cached) > 1, cached
        assert not any(x and y for x, y in zip(cached, cached[1:])), cached


def _inductor_matches_eager_inner(pipe, ref, name):
    try:
        eager_out, eager_rows, _ = cached_runs(pipe, name)
        cf.enable_cache(pipe, cache_config=config(name), compile=True)
        out = run(pipe, name)
        rows = cf.summary(pipe, details=True)
    finally:
        cf.disable_cache(pipe)
    assert per_step_cached(rows) == per_step_cached(eager_rows)
    assert sum(per_step_cached(rows)) > 0
    torch.testing.assert_close(out, eager_out, rtol=1e-3, atol=1e-3)
    assert torch.equal(run(pipe, name), ref)


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_makes_the_same_decisions(flux):
    _inductor_matches_eager_inner(*flux, "flux")


@pytest.mark.slow
@pytest.mark.inductor
def test_inductor_with_islands_and_glue_cat():
    """HiDream under Inductor: its MoE islands run as extern calls inside the cond's full branch, and
    the value its double->single glue concatenates is also a cond operand (rewrite.own_buffer)."""
    pipe = zoo.build_pipeline("hidream")
    _inductor_matches_eager_inner(pipe, run(pipe, "hidream"), "hidream")


def test_supported_pipelines():
    count, names = cf.supported_pipelines()
    assert names == sorted(set(names)) and count == len(names)
    assert {f.pipeline_class for f in zoo.families()} <= set(names)  # the zoo's pipelines are in the matrix


@pytest.mark.slow
def test_many_enables_in_one_process_keep_caching():
    """Dynamo's recompile_limit (8) counts per code object; enable_cache compiles a private copy of the
    forward's code, so the 9th+ enable_cache (of a transformer class, or any diffusers transformer behind
    the shared peft wrapper) still caches instead of silently running eager. The limit is lowered to 2
    here to hit it in 3 enables."""
    pipe = zoo.build_pipeline("sd3")
    with torch._dynamo.config.patch(recompile_limit=2):
        for i in range(3):
            try:
                cf.enable_cache(pipe, cache_config=config("sd3"), compile=False)
                zoo.run_pipeline(pipe, "sd3", num_inference_steps=4)
                rows = chain_rows(cf.summary(pipe))
            finally:
                cf.disable_cache(pipe)
            assert rows and len(rows[0].cached_steps) == 2, (i, rows)


def test_summary_of_a_model_without_cachedit_graphs_says_why(capsys):
    transformer, _ = zoo.build_transformer("flux")
    assert cf.summary(transformer) == []
    out = capsys.readouterr().out
    assert "no cachedit graph has run" in out and "recompile_limit" in out


@pytest.mark.slow
def test_shapes_beyond_the_graph_limit_run_uncached_with_one_warning(monkeypatch):
    """With static shapes (dynamic=False) each input shape compiles its own graph and state; past
    MAX_GRAPHS, calls with new shapes run the plain forward (one warning) instead of failing, and known
    shapes keep using their cached graphs."""
    from cachedit_fx.install import graph as install_graph
    from cachedit_fx.install.hook import cache_hook
    from cachedit_fx.zoo.components import latent_image_ids

    monkeypatch.setattr(install_graph, "MAX_GRAPHS", 2)
    transformer, kwargs = zoo.build_transformer("flux")

    def at(side):
        return dict(kwargs, hidden_states=torch.randn(1, side * side, 16, generator=torch.Generator().manual_seed(side)),
                    img_ids=latent_image_ids(side))

    with torch.no_grad():
        expected = {side: transformer(**at(side))[0] for side in (4, 5, 6)}
        cf.enable_cache(transformer, cache_config=config("flux"), compile=False, dynamic=False)
        try:
            transformer(**at(4))
            transformer(**at(5))
            with pytest.warns(UserWarning, match="calls with further shapes run uncached") as caught:
                out = transformer(**at(6))[0]
                again = transformer(**at(6))[0]
            assert sum("further shapes" in str(w.message) for w in caught) == 1
            assert torch.equal(out, expected[6]) and torch.equal(again, expected[6])
            handle = cache_hook(transformer).handle
            n_graphs = len(handle.graphs)
            transformer(**at(4))  # a known shape: its graph, no new compile
            assert len(handle.graphs) == n_graphs == 2
        finally:
            cf.disable_cache(transformer)
