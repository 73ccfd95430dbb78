"""One-line pipeline API: enable_cache / disable_cache / summary / strify / reset / supported_pipelines
on the offline zoo's diffusers pipelines (tiny random models, CPU, compile=False unless stated)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cachedit_fx as cf
from cachedit_fx.testing import zoo

STEPS = 8
BASE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.8, max_warmup_steps=2)

# Per-family thresholds. AuraFlow's tiny random model: the relative L1 change of block 0's residual between
# steps is 0.97-2.2 (checked by hand with a forward hook on joint_transformer_blocks[0], equal to the
# diffs summary reports), so nothing in 0.5-0.95 ever caches; that is the model, not the pass.
THRESHOLDS = {"auraflow": 1.5}

# Families the passes cannot cache yet (they compile uncached with the warning quoted). Not strict: they
# pass once the passes learn them.
XFAIL = {
    "hunyuanvideo": "passes/patterns.py: 'single_transformer_blocks.0: output ... continues several streams "
                    "(encoder_hidden_states_.., hidden_states_..); cannot tell them apart' -- the single block "
                    "cats [H, E] and splits its output; _continues breaks the tie by shape only, and in the tiny "
                    "model both streams are (1, 32, C) (32 latent tokens = max_sequence_length 32)",
    "hidream": "graph breaks inside every block (MoE moe_infer: flat_expert_indices.bincount().cpu().numpy(), "
               "data-dependent shapes), so no graph holds >= 2 consecutive blocks: 'no repeated transformer "
               "blocks found' for each of the ~26 graphs",
    "mochi": "graph break inside every block (MochiAttnProcessor drops padded text tokens with torch.nonzero: "
             "aten.nonzero output shape depends on data), so no graph holds >= 2 consecutive blocks: "
             "'no repeated transformer blocks found' for each of the ~11 graphs",
}

SEPARATE_CFG = ("wan", "cogview4", "qwenimage", "chroma", "lumina2")


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.detach().float().cpu().numpy(), ref.detach().float().cpu().numpy()
    mse = float(np.mean((a - b) ** 2))
    peak = max(float(b.max() - b.min()), 1e-8)
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


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


def chain_rows(rows):
    return [r for r in rows if "unmatched" not in r]


def per_step_cached(rows) -> list[bool]:
    rs = chain_rows(rows)
    assert len(rs) == 1, rs
    return [s["cached"] for s in rs[0]["per_step"]]


@pytest.fixture(scope="module")
def flux():
    """One Flux pipeline and its uncached output, shared; each test leaves it uncached."""
    pipe = zoo.build_pipeline("flux")
    ref = run(pipe, "flux")
    yield pipe, ref
    cf.disable_cache(pipe)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n], strict=False))
                                  if n in XFAIL else n for n in zoo.FAMILY_NAMES])
def test_family_caches_and_disable_restores(name):
    pipe = zoo.build_pipeline(name)
    ref = run(pipe, name)
    try:
        out, rows, warned = cached_runs(pipe, name)
        again = run(pipe, name)
    finally:
        cf.disable_cache(pipe)
    cached = sum(r["cached_steps"] for r in chain_rows(rows))
    value = psnr(out, ref)
    print(f"{name}: cached {cached} steps ({[r.get('cached_steps') for r in rows]}), PSNR {value:.2f} dB")
    assert cached > 0, f"{name}: no cached step; summary {rows}; warnings {warned}"
    assert not torch.equal(out, ref), f"{name}: cached steps but the output equals the uncached one"
    assert np.isfinite(value), f"{name}: PSNR {value}"
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, again), f"{name}: a second call differs (state not reset per request)"
    assert torch.equal(run(pipe, name), ref), f"{name}: disable_cache did not restore the uncached output"


def test_same_pipeline_twice_is_identical(flux):
    pipe, _ = flux
    try:
        out, _, _ = cached_runs(pipe, "flux")
        first = cf.summary(pipe, details=True)
        out2 = run(pipe, "flux")
        second = cf.summary(pipe, details=True)
    finally:
        cf.disable_cache(pipe)
    assert torch.equal(out, out2)
    assert per_step_cached(first) == per_step_cached(second)
    assert sum(per_step_cached(second)) > 0


def test_reset_starts_a_new_request(flux):
    pipe, _ = flux
    try:
        out, _, _ = cached_runs(pipe, "flux")
        cf.reset(pipe)
        assert all(r["steps"] == 0 for r in chain_rows(cf.summary(pipe)))
        again = run(pipe, "flux")
    finally:
        cf.disable_cache(pipe)
    assert torch.equal(out, again)


def test_two_pipelines_interleaved_match_each_alone():
    """Flux and SD3, and a second Flux with other settings: each alone, then one run inside another's
    denoising loop (from its step callback) and alternating calls; outputs must not change."""
    a, b, c = zoo.build_pipeline("flux"), zoo.build_pipeline("sd3"), zoo.build_pipeline("flux")
    try:
        cf.enable_cache(a, cache_config=config("flux"), compile=False)
        cf.enable_cache(b, cache_config=config("sd3"), compile=False)
        cf.enable_cache(c, cache_config=config("flux", max_warmup_steps=4, max_cached_steps=2), compile=False)
        assert type(a) is not type(c) and type(a).__name__ == "FluxPipeline"
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
        assert cf.strify(a) != cf.strify(c)
    finally:
        for p in (a, b, c):
            cf.disable_cache(p)


@pytest.mark.parametrize("name", SEPARATE_CFG)
def test_separate_cfg_has_two_branches(name):
    assert zoo.get(name).separate_cfg
    pipe = zoo.build_pipeline(name)
    try:
        _, rows, warned = cached_runs(pipe, name)
    finally:
        cf.disable_cache(pipe)
    used = [r for r in chain_rows(rows) if r["steps"] > 0]
    assert sorted({r["branch"] for r in used}) == [0, 1], f"{name}: {rows}; warnings {warned}"
    for r in used:
        assert r["steps"] == STEPS, r
        assert r["diffs"], f"{name}: branch {r['branch']} has no diff stats: {r}"
        assert len(r["per_step"]) == r["steps"]
    assert all(r["cached_steps"] > 0 for r in used), rows


def test_max_cached_steps(flux):
    pipe, _ = flux
    try:
        _, rows, _ = cached_runs(pipe, "flux", max_cached_steps=2)
    finally:
        cf.disable_cache(pipe)
    cached = per_step_cached(rows)
    assert sum(cached) == 2, cached  # 6 of 8 cache without the limit


def test_max_continuous_cached_steps(flux):
    pipe, _ = flux
    try:
        _, rows, _ = cached_runs(pipe, "flux", max_continuous_cached_steps=1)
    finally:
        cf.disable_cache(pipe)
    cached = per_step_cached(rows)
    assert sum(cached) > 0, cached
    assert not any(x and y for x, y in zip(cached, cached[1:])), cached


@pytest.mark.parametrize("warmup", [1, 4])
def test_warmup_steps_never_cache(flux, warmup):
    pipe, _ = flux
    try:
        _, rows, _ = cached_runs(pipe, "flux", max_warmup_steps=warmup)
    finally:
        cf.disable_cache(pipe)
    cached = per_step_cached(rows)
    gates = [s["gate"] for s in chain_rows(rows)[0]["per_step"]]
    assert not any(cached[:warmup]), cached
    assert gates[:warmup] == ["warmup"] * warmup, gates
    assert any(cached[warmup:]), cached


def test_summary_plot_and_strify(flux, tmp_path):
    pipe, _ = flux
    path = tmp_path / "d.png"
    try:
        cached_runs(pipe, "flux")
        cf.summary(pipe, plot=path)
        tag = cf.strify(pipe)
    finally:
        cf.disable_cache(pipe)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tag.startswith("DBCache_F1B0"), tag
    assert tag.endswith("_S6"), tag


def test_inductor_makes_the_same_decisions(flux):
    pipe, ref = flux
    try:
        eager_out, eager_rows, _ = cached_runs(pipe, "flux")
        cf.enable_cache(pipe, cache_config=config("flux"), compile=True)
        out = run(pipe, "flux")
        rows = cf.summary(pipe, details=True)
    finally:
        cf.disable_cache(pipe)
    assert per_step_cached(rows) == per_step_cached(eager_rows)
    assert sum(per_step_cached(rows)) > 0
    torch.testing.assert_close(out, eager_out, rtol=1e-3, atol=1e-3)
    assert torch.equal(run(pipe, "flux"), ref)


def test_supported_pipelines():
    names = cf.supported_pipelines()
    assert "FluxPipeline" in names and "WanPipeline" in names
    assert names == sorted(set(names))
