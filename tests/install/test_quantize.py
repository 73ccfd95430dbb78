"""torchao-quantized transformers through the cache (install/quantize.py, passes/subclass.py): zoo Flux and
Wan quantized by torchao before or after ``enable_cache`` or through ``quantize_config=``, cached by the
graph pass (Inductor; no inner compiler), the eager cache and an exported package: one graph, no break, no
step cached at threshold 0 (the quantized model's own output), at a caching threshold the steps the
unquantized model caches, with the PSNR against the quantized uncached image printed; cache-dit's layer
choice; the quant types this machine cannot run refused by name with the ones it can."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cachedit_fx
from cachedit_fx import zoo
from cachedit_fx.errors import ConfigError
from cachedit_fx.install.hook import cache_hook
from cachedit_fx.passes.subclass import is_user_subclass
from cachedit_fx.tools import metrics

ao = pytest.importorskip("torchao.quantization", reason="torchao 0.18.0 (pip install 'cachedit-fx[quant]')")

STEPS = 8
THRESHOLD = {"flux": 0.45, "wan": 0.1}
CACHE = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2)


def _cache(family: str, threshold: float) -> dict:
    separate = dict(enable_separate_cfg=True) if family == "wan" else {}  # the zoo Wan runs CFG as a second call
    return dict(CACHE, residual_diff_threshold=threshold, **separate)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """dB over the reference's value range."""
    return metrics.psnr(reference.double().numpy(), image.double().numpy(),
                        data_range=float(reference.max() - reference.min()))


def quantized_pipeline(family: str):
    """A zoo pipeline whose transformer torchao has quantized (int8 weight-only, every linear)."""
    pipe = zoo.build_pipeline(family)
    ao.quantize_(pipe.transformer, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    return pipe


def _cached_steps(pipe) -> list[int]:
    (stats,) = [s for s in cachedit_fx.summary(pipe, logging=False) if s.unmatched is None]
    return sorted({*stats.cached_steps, *stats.cfg_cached_steps})


def two_requests(pipe, family: str) -> dict:
    """Threshold 0, then the family's caching threshold (refresh_context: no recompile)."""
    first = zoo.run_pipeline(pipe, family, num_inference_steps=STEPS)
    at_zero = _cached_steps(pipe)
    cachedit_fx.refresh_context(pipe, residual_diff_threshold=THRESHOLD[family])
    second = zoo.run_pipeline(pipe, family, num_inference_steps=STEPS)
    return dict(at_zero=at_zero, image_at_zero=first, cached=_cached_steps(pipe), image=second)


@pytest.fixture(scope="module")
def uncached():
    """Per family: the quantized pipeline's uncached image (the reference image) and the steps the
    unquantized pipeline caches at the family's threshold (the reference decisions)."""
    out = {}
    for family in THRESHOLD:
        plain = zoo.build_pipeline(family)
        cachedit_fx.enable_cache(plain, cache_config=_cache(family, 0.0), compile=False)
        decisions = two_requests(plain, family)
        assert decisions["at_zero"] == [] and decisions["cached"], decisions
        out[family] = (zoo.run_pipeline(quantized_pipeline(family), family, num_inference_steps=STEPS),
                       decisions["cached"])
    return out


def _check(run: dict, reference: tuple, family: str, how: str) -> None:
    image, unquantized_cached = reference
    assert run["at_zero"] == [], run["at_zero"]
    torch.testing.assert_close(run["image_at_zero"], image, rtol=1e-5, atol=1e-5)
    assert run["cached"] == unquantized_cached, (family, how, run["cached"], unquantized_cached)
    print(f"\n{family} int8 weight-only, {how}: cached {run['cached']}, "
          f"PSNR vs quantized uncached {psnr(run['image'], image):.1f} dB")


# ----------------------------------------------------------------------------- Inductor


@pytest.mark.slow
@pytest.mark.inductor
@pytest.mark.parametrize("family", list(THRESHOLD))
def test_quantized_zoo_pipeline_caches_in_one_inductor_graph(family, uncached):
    pipe = quantized_pipeline(family)
    cachedit_fx.enable_cache(pipe, cache_config=_cache(family, 0.0))
    counters.clear()
    run = two_requests(pipe, family)
    assert counters["stats"]["unique_graphs"] == 1 and not sum(counters["graph_break"].values()), dict(counters)
    assert len(cache_hook(pipe.transformer).handle.graphs) == 1
    _check(run, uncached[family], family, "Inductor")


# ----------------------------------------------------------------------------- no inner compiler, eager cache


@pytest.mark.slow
@pytest.mark.parametrize("family, how", [("flux", "quantize_ after enable_cache"), ("flux", "quantize_config="),
                                         ("flux", "eager cache"), ("wan", "quantize_config=")])
def test_quantized_pipeline_caches_without_inductor(family, how, uncached):
    pipe = zoo.build_pipeline(family)
    if how == "quantize_config=":  # every linear, as the uncached reference has them
        cachedit_fx.enable_cache(pipe, cache_config=_cache(family, 0.0), compile=False,
                                 quantize_config=cachedit_fx.QuantizeConfig(quant_type="int8_weight_only",
                                                                            regional_quantize=False, exclude_layers=[]))
    else:
        cachedit_fx.enable_cache(pipe, cache_config=_cache(family, 0.0), compile=False, eager=how == "eager cache")
        ao.quantize_(pipe.transformer, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    assert all(is_user_subclass(m.weight) for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))
    run = two_requests(pipe, family)
    if how != "eager cache":
        assert len(cache_hook(pipe.transformer).handle.graphs) == 1
    _check(run, uncached[family], family, how)


@pytest.mark.slow
def test_two_quantized_transformers_keep_their_own_statistics():
    """Subclass weights all report data_ptr() == 0: the installs are found by weight identity instead."""
    first, second = quantized_pipeline("flux"), quantized_pipeline("flux")
    cachedit_fx.enable_cache(first, cache_config=_cache("flux", THRESHOLD["flux"]), compile=False)
    cachedit_fx.enable_cache(second, cache_config=_cache("flux", THRESHOLD["flux"]), compile=False)
    zoo.run_pipeline(first, "flux", num_inference_steps=STEPS)
    assert _cached_steps(first)
    assert [s.cached_steps for s in cachedit_fx.summary(second.transformer, logging=False)] in ([], [[]])


# ----------------------------------------------------------------------------- export


@pytest.mark.slow
@pytest.mark.export
@pytest.mark.inductor
def test_quantized_flux_exports_and_decides_as_the_graph_path(tmp_path):
    from cachedit_fx.export import export, load

    from tests.export.common import pipeline_call_kwargs

    pipe = quantized_pipeline("flux")
    kwargs = pipeline_call_kwargs(pipe)
    cache = _cache("flux", 0.6)
    loaded = load(export(pipe.transformer, example_kwargs=kwargs, cache_config=cache, path=str(tmp_path / "q.pt2")))
    with torch.no_grad():
        _, from_package = zoo.denoise(None, "flux", kwargs, num_steps=STEPS, call=loaded)
    cachedit_fx.enable_cache(pipe.transformer, cache_config=cache, compile=False)
    with torch.no_grad():
        _, from_graph = zoo.denoise(pipe.transformer, "flux", kwargs, num_steps=STEPS)
    (stats,) = cachedit_fx.summary(pipe.transformer, logging=False)
    package_log = loaded.handle.chains[0].state.tensors["cached_log"][0, :STEPS, 0]
    assert stats.cached_steps and sorted(stats.cached_steps) == package_log.nonzero().flatten().tolist()
    for a, b in zip(from_package, from_graph):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- which layers, which types


def test_quantize_config_takes_cache_dits_layers():
    """Linears inside the repeated blocks, names with an excluded substring left out: on tiny Flux the
    80 in-block linears, none of the 8 outside (embedders, norm_out, proj_out)."""
    transformer, _ = zoo.build_transformer("flux")
    cachedit_fx.quantize(transformer, cachedit_fx.QuantizeConfig(quant_type="int8_weight_only"))
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in linears.items() if is_user_subclass(m.weight)}
    in_blocks = {n for n in linears if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert quantized == in_blocks and len(quantized) == 80 and len(linears) == 88
    assert transformer._is_quantized and transformer._quantize_type == "int8_weight_only"
    excluded = cachedit_fx.QuantizeConfig(quant_type="int8_weight_only", exclude_layers=["attn"])
    transformer, _ = zoo.build_transformer("flux")
    cachedit_fx.quantize(transformer, excluded)
    assert not any(is_user_subclass(m.weight) for n, m in transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and "attn" in n)


@pytest.mark.parametrize("quant_type", ["int8_per_row", "int8_per_tensor", "float8_weight_only"])
def test_every_cpu_quant_type_runs_here(quant_type):
    transformer, inputs = zoo.build_transformer("flux")
    with torch.no_grad():
        want = transformer(**inputs)[0]
    cachedit_fx.quantize(transformer, cachedit_fx.QuantizeConfig(quant_type=quant_type))
    assert is_user_subclass(transformer.transformer_blocks[0].attn.to_q.weight)
    with torch.no_grad():
        got = transformer(**inputs)[0]
    assert psnr(got, want) > 20, psnr(got, want)


@pytest.mark.parametrize("quant_type", ["float8_per_row", "float8_per_tensor", "float8_per_block", "nvfp4",
                                        "nvfp4_weight_only", "int4_weight_only"])
def test_gpu_quant_types_are_refused_on_cpu_naming_the_ones_that_run(quant_type):
    transformer, _ = zoo.build_transformer("flux")
    with pytest.raises(ConfigError, match=rf"quant_type='{quant_type}' needs a CUDA GPU .* int8_weight_only, "
                                          r"int8_per_row, int8_per_tensor, float8_weight_only"):
        cachedit_fx.enable_cache(transformer, quantize_config=cachedit_fx.QuantizeConfig(quant_type=quant_type))
    assert not any(is_user_subclass(p) for p in transformer.parameters())


def test_bad_quantize_fields_name_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"QuantizeConfig\.quant_type.*int8_weight_only.*'int9'"):
        cachedit_fx.QuantizeConfig(quant_type="int9")
    with pytest.raises(ConfigError, match=r"QuantizeConfig\.precision_plan\['attn'\].*one of"):
        cachedit_fx.QuantizeConfig(quant_type="int8_weight_only", precision_plan={"attn": "fp3"})
    with pytest.raises(ConfigError, match=r"QuantizeConfig\.repeated_blocks: no \['NoSuchBlock'\] inside Sequential"):
        cachedit_fx.quantize(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                             cachedit_fx.QuantizeConfig(quant_type="int8_weight_only", repeated_blocks=["NoSuchBlock"]))
