"""AOT export: the packaged cached transformer reproduces the compiled path, in a loop and in a pipeline,
at static and dynamic shapes, for a diffusers model and a hand-written DiT (exported by the CLI), and
with separate CFG; the loaded package's request boundaries, call checks, summary / reset / refresh."""
import pytest
import torch

import cachedit_fx
from cachedit_fx.runtime.handle import handles_for
from cachedit_fx.export import export, load
from cachedit_fx import zoo

from tests.export.common import CACHE, dynamic_spec, flux_inputs, pipeline_call_kwargs
from tests.helpers.dynamo import compile_own

pytestmark = [pytest.mark.slow, pytest.mark.export, pytest.mark.inductor]
STEPS = 20


@pytest.fixture(scope="module", params=[None, {"taylorseer_order": 1}], ids=["dbcache", "taylorseer"])
def package(request, flux_pipe, tmp_path_factory):
    """The pipeline's own call (return_dict=False: a tuple), and, for TaylorSeer, the same call with the
    forward's default return_dict=True (its output class)."""
    kwargs = pipeline_call_kwargs(flux_pipe)
    if request.param is not None:
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    path = str(tmp_path_factory.mktemp("pkg") / "flux.pt2")
    export(flux_pipe.transformer, example_kwargs=kwargs, cache_config=CACHE, calibrator_config=request.param,
           path=path)
    return path, kwargs, request.param


def _loop(call, inputs, steps=STEPS):
    with torch.no_grad():
        return zoo.denoise(None, "flux", inputs, num_steps=steps, call=call)


def test_package_matches_compiled_path(package, flux_pipe):
    path, kwargs, calib = package
    loaded = load(path)
    compiled = compile_own(flux_pipe.transformer, backend="cachedit", dynamic=False,
                           options=dict(cache_config=CACHE, calibrator_config=calib, inner="aot_eager"))
    _, out_pkg = _loop(loaded, kwargs)
    _, out_cmp = _loop(compiled, kwargs)
    pkg_log = loaded.handle.chains[0].state.tensors["cached_log"][0, :STEPS, 0]
    cmp_log = handles_for(flux_pipe.transformer)[-1].chains[0].state.tensors["cached_log"][0, :STEPS, 0]
    assert pkg_log.sum() > 0
    assert torch.equal(pkg_log, cmp_log)
    for a, b in zip(out_pkg, out_cmp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A second request resets on device (the timestep turns back up) and decides the same again.
    _, again = _loop(loaded, kwargs)
    assert torch.equal(loaded.handle.chains[0].state.tensors["cached_log"][0, :STEPS, 0], pkg_log)
    assert all(torch.equal(a, b) for a, b in zip(out_pkg, again))
    # A request of another step count decides as the compiled path does too.
    _, short_pkg = _loop(loaded, kwargs, STEPS // 2)
    _, short_cmp = _loop(compiled, kwargs, STEPS // 2)
    assert torch.equal(loaded.handle.chains[0].state.tensors["cached_log"][0, :STEPS // 2, 0],
                       handles_for(flux_pipe.transformer)[-1].chains[0].state.tensors["cached_log"][0, :STEPS // 2, 0])
    for a, b in zip(short_pkg, short_cmp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The model's own output structure, and the same call by position.
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    with torch.no_grad():
        by_name = loaded(**kwargs)
        names = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"]
        by_position = loaded(*[kwargs[n] for n in names], **{k: v for k, v in kwargs.items() if k not in names})
    assert type(by_name) is (tuple if kwargs.get("return_dict") is False else Transformer2DModelOutput)
    assert type(by_position) is type(by_name)


def test_package_runs_inside_pipeline(package):
    path, _, calib = package
    if calib is not None:
        pytest.skip("one pipeline run is enough")
    pipe = zoo.build_pipeline("flux")
    reference = zoo.run_pipeline(pipe, "flux", num_inference_steps=8)
    pipe.transformer = load(path)
    first = zoo.run_pipeline(pipe, "flux", num_inference_steps=8)
    second = zoo.run_pipeline(pipe, "flux", num_inference_steps=8)
    assert torch.equal(first, second)
    assert not torch.equal(first, reference)  # it cached something
    stats = cachedit_fx.summary(pipe.transformer)
    assert len(stats[0].cached_steps) > 0


def test_loaded_package_rejects_other_shapes(package):
    path, kwargs, _ = package
    loaded = load(path)
    bad = dict(kwargs, hidden_states=torch.cat([kwargs["hidden_states"]] * 2))
    with pytest.raises(ValueError, match="hidden_states: shape .* static in shape"):
        loaded(**bad)


# ----------------------------------------------------------------------------- dynamic shapes


@pytest.fixture(scope="module")
def dynamic_package(flux_pipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dyn") / "flux_dynamic.pt2")
    export(flux_pipe.transformer, example_kwargs=flux_inputs(flux_pipe.transformer, 2, 8), cache_config=CACHE,
           path=path, dynamic_shapes=dynamic_spec())
    return path


@pytest.mark.parametrize("batch,side", [(2, 8), (3, 12), (2, 6)])
def test_dynamic_package_matches_compiled_path_per_shape(dynamic_package, flux_pipe, batch, side):
    """One package serves other batch sizes and resolutions, deciding as a static compile of each shape."""
    loaded = load(dynamic_package)
    inputs = flux_inputs(flux_pipe.transformer, batch, side)
    compiled = compile_own(flux_pipe.transformer, backend="cachedit", dynamic=False,
                           options=dict(cache_config=CACHE, inner="eager"))
    _, out_pkg = zoo.denoise(None, "flux", inputs, num_steps=10, call=loaded)
    _, out_cmp = zoo.denoise(None, "flux", inputs, num_steps=10, call=compiled)
    pkg_log = loaded.handle.chains[0].state.tensors["cached_log"][0, :10, 0]
    cmp_log = handles_for(flux_pipe.transformer)[-1].chains[0].state.tensors["cached_log"][0, :10, 0]
    assert pkg_log.sum() > 0
    assert torch.equal(pkg_log, cmp_log)
    for a, b in zip(out_pkg, out_cmp):
        assert a.shape == (batch, side * side, 16)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dynamic_package_shape_change_is_a_computed_step(dynamic_package, flux_pipe):
    loaded = load(dynamic_package)
    small, large = flux_inputs(flux_pipe.transformer, 2, 8), flux_inputs(flux_pipe.transformer, 2, 12)
    with torch.no_grad():
        for i in range(5):
            loaded(**dict(small, timestep=torch.full((2,), 1.0 - i / 10)))
        log = loaded.handle.chains[0].state.tensors["cached_log"][0, :, 0]
        assert log[4]  # at this shape the next step would cache too
        t = torch.full((2,), 0.5)
        out = loaded(**dict(large, timestep=t))[0]
        expected = flux_pipe.transformer(**dict(large, timestep=t))[0]
    assert not log[5]
    assert loaded.handle.chains[0].state.tensors["gate_log"][0, 5, 0] == 7  # no_reference: the state started afresh
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_package_rejects_sizes_out_of_range(dynamic_package, flux_pipe):
    loaded = load(dynamic_package)
    with pytest.raises(ValueError, match=r"hidden_states: shape \[2, 1600, 16\] does not fit .*1024"):
        loaded(**flux_inputs(flux_pipe.transformer, 2, 40))


# ----------------------------------------------------------------------------- any DiT, any call


@pytest.fixture(scope="module")
def dit_package(tmp_path_factory):
    """A hand-written DiT (``forward(x, ctx, noise_level)`` returning a tensor), exported by the CLI from its
    factory."""
    from cachedit_fx.tools.cli import main

    path = str(tmp_path_factory.mktemp("dit") / "dit.pt2")
    assert main(["export", "--config", "tests.helpers.tinydit:cross_dit", "--args", "x=1x12x16", "--args", "ctx=1x5x16",
                 "--args", "noise_level=1", "--fn", "1", "--threshold", "0.9", "--warmup", "2", "--out", path]) == 0
    return path


DIT_CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.9, max_warmup_steps=2)


def test_hand_written_dit_package_called_by_position_and_by_name(dit_package):
    """Decisions and outputs equal the compiled path's over two requests of different step counts,
    called positionally and by keyword, and a tensor comes back as a tensor."""
    from tests.helpers.tinydit import cross_dit, euler, latent

    model, loaded = cross_dit(), load(dit_package)
    compiled = compile_own(model, backend="cachedit", fullgraph=True, dynamic=False,
                           options=dict(cache_config=DIT_CACHE, inner="eager"))
    x, ctx = latent(12), latent(5, seed=2)
    for steps, call in ((8, loaded), (5, lambda x, ctx, t: loaded(x=x, noise_level=t, ctx=ctx))):
        out_pkg = euler(call, x, steps, ctx)
        out_cmp = euler(compiled, x, steps, ctx)
        pkg_log = loaded.handle.chains[0].state.tensors["cached_log"][0, :steps, 0]
        cmp_log = handles_for(model)[-1].chains[0].state.tensors["cached_log"][0, :steps, 0]
        assert pkg_log.sum() > 0 and torch.equal(pkg_log, cmp_log), (pkg_log, cmp_log)
        assert all(type(o) is torch.Tensor for o in out_pkg)
        for a, b in zip(out_pkg, out_cmp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loaded_package_tells_requests_apart(dit_package):
    """Request boundaries inside the package, from its timestep (``noise_level``, found by dataflow)
    and latent: a warm-up call, a request abandoned after one call, an img2img request after a
    cancelled one (after a gap in the timestep, or a step of twice the last); each request then runs as
    after a reset."""
    from tests.helpers.tinydit import latent, request, uniform

    loaded, ctx = load(dit_package), latent(5, seed=2)
    x, img2img = latent(12), [0.5 - 0.0625 * i for i in range(8)]
    want = request(loaded, uniform(8), x, ctx)
    want_img2img = request(loaded, img2img, latent(12, seed=5), ctx)
    assert loaded.handle.chains[0].state.tensors["cached_log"][0, :8, 0].any()
    for before in ([1.0], uniform(8)[:1], [1.0, 0.9375, 0.875, 0.8125, 0.75]):
        cachedit_fx.reset(loaded)
        request(loaded, before, latent(12, seed=9), ctx)
        assert all(torch.equal(a, b) for a, b in zip(request(loaded, uniform(8), x, ctx), want)), before
        request(loaded, [1.0, 0.9375, 0.875, 0.8125, 0.75], latent(12, seed=3), ctx)
        got = request(loaded, img2img, latent(12, seed=5), ctx)
        assert all(torch.equal(a, b) for a, b in zip(got, want_img2img)), before
    # cancelled at t=0.75 of 8 steps, img2img from t=0.5: the timestep moves on by exactly twice its step
    cachedit_fx.reset(loaded)
    short = [0.5, 0.375, 0.25, 0.125]
    want_short = request(loaded, short, latent(12, seed=5), ctx)
    request(loaded, uniform(8)[:3], latent(12, seed=3), ctx)
    assert all(torch.equal(a, b) for a, b in zip(request(loaded, short, latent(12, seed=5), ctx), want_short))


def test_wrong_calls_of_a_loaded_package_name_the_argument(dit_package, package):
    from tests.helpers.tinydit import latent

    loaded = load(dit_package)
    x, ctx, t = latent(12), latent(5, seed=2), torch.ones(1)
    with pytest.raises(cachedit_fx.ConfigError, match=r"x: shape \[1, 13, 16\] does not fit"):
        loaded(latent(13), ctx, t)
    with pytest.raises(cachedit_fx.ConfigError, match="noise_level: exported as a tensor, called with float"):
        loaded(x, ctx, 1.0)
    with pytest.raises(cachedit_fx.ConfigError, match="call: missing a required argument: 'noise_level'"):
        loaded(x, ctx)
    path, kwargs, _ = package
    if kwargs.get("return_dict") is False:
        with pytest.raises(cachedit_fx.ConfigError, match="return_dict: exported with False, called with True"):
            load(path)(**dict(kwargs, return_dict=True))


def test_loaded_package_summary_reset_refresh_and_disable(dit_package):
    from tests.helpers.tinydit import euler, latent

    loaded = load(dit_package)
    x, ctx = latent(12), latent(5, seed=2)
    euler(loaded, x, 6, ctx)
    cached = cachedit_fx.summary(loaded, logging=False)[0].cached_steps
    assert cached
    cachedit_fx.reset(loaded)
    assert cachedit_fx.summary(loaded, logging=False)[0].cached_steps == []
    cachedit_fx.refresh_context(loaded, residual_diff_threshold=0.0)  # a number: the package takes it
    euler(loaded, x, 6, ctx)
    assert cachedit_fx.summary(loaded, logging=False)[0].cached_steps == []
    with pytest.raises(cachedit_fx.ConfigError, match="Fn_compute_blocks are compiled into"):
        cachedit_fx.refresh_context(loaded, Fn_compute_blocks=2)
    with pytest.warns(UserWarning, match="loaded export package"):
        cachedit_fx.disable_cache(loaded)


def test_separate_cfg_package_matches_compiled_path(tmp_path):
    """Wan, cond and uncond calls alternating: both branches decide as the compiled path does, over two
    requests of different step counts; the layout (branch_by included) round-trips by name."""
    transformer, inputs = zoo.build_transformer("wan")
    fam = zoo.get("wan")
    uncond = fam.uncond_inputs(transformer, 0)
    cache = dict(Fn_compute_blocks=1, residual_diff_threshold=0.1, max_warmup_steps=2, enable_separate_cfg=True)
    path = export(transformer, example_kwargs=inputs, cache_config=cache, path=str(tmp_path / "wan.pt2"))
    loaded = load(path)
    compiled = compile_own(transformer, backend="cachedit", fullgraph=True, dynamic=False,
                           options=dict(cache_config=cache, inner="eager"))
    for steps in (6, 4):
        _, out_pkg = zoo.denoise(None, fam, inputs, num_steps=steps, uncond=uncond, call=loaded)
        _, out_cmp = zoo.denoise(None, fam, inputs, num_steps=steps, uncond=uncond, call=compiled)
        cmp_chain = handles_for(transformer)[-1].chains[0]
        assert loaded.handle.chains[0].layout == cmp_chain.layout  # every field, by name, through the package
        for b in (0, 1):
            pkg_log = loaded.handle.chains[0].state.tensors["cached_log"][b, :steps, 0]
            assert torch.equal(pkg_log, cmp_chain.state.tensors["cached_log"][b, :steps, 0]), b
        assert loaded.handle.chains[0].state.tensors["cached_log"][:, :steps].any()
        for a, b in zip(out_pkg, out_cmp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
