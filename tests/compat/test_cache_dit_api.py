"""cache-dit 1.5.3's helpers beside ``enable_cache``, each against cache-dit itself where it runs on a CPU:
``load_configs`` (its YAML layout), ``set_compile_configs`` (the same global settings), ``block_range``,
``PatchFunctor`` (cache-dit's own Flux functor, then the graph pass), ``BlockAdapterRegister`` (a
registered adapter pins the chain), ``set_attn_backend``; and the parallelism options refused before any
rank touches the model, each naming the field and what it allows."""
from __future__ import annotations

import pytest
import torch

import cachedit_fx
from cachedit_fx import zoo
from cachedit_fx.errors import ConfigError

reference = pytest.importorskip("cache_dit", reason="cache-dit 1.5.3 (pip install --no-deps cache-dit==1.5.3)")

YAML = """\
cache_config:
  max_warmup_steps: 2
  warmup_interval: 1
  max_cached_steps: -1
  max_continuous_cached_steps: 2
  Fn_compute_blocks: 1
  Bn_compute_blocks: 0
  residual_diff_threshold: 0.12
  enable_taylorseer: true
  taylorseer_order: 1
parallelism_config:
  ulysses_size: 2
  attention_backend: native
attention_backend: native
quantize_config:
  quant_type: int8_weight_only
  exclude_layers: ["embedder", "embed"]
"""
CACHE_FIELDS = ("max_warmup_steps", "warmup_interval", "max_cached_steps", "max_continuous_cached_steps",
                "Fn_compute_blocks", "Bn_compute_blocks", "residual_diff_threshold")


def test_load_configs_reads_cache_dits_yaml_as_cache_dit_does(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "cache_dit.yaml"
    path.write_text(YAML)
    ours, theirs = cachedit_fx.load_configs(str(path)), reference.load_configs(str(path))
    assert set(ours) == set(theirs)
    for name in CACHE_FIELDS:
        assert getattr(ours["cache_config"], name) == getattr(theirs["cache_config"], name), name
    assert ours["calibrator_config"].taylorseer_order == theirs["calibrator_config"].taylorseer_order == 1
    assert ours["attention_backend"] == theirs["attention_backend"] == "native"
    for name in ("ulysses_size", "ring_size", "tp_size", "attention_backend"):
        assert getattr(ours["parallelism_config"], name) == getattr(theirs["parallelism_config"], name), name
    assert str(ours["parallelism_config"].backend) == str(theirs["parallelism_config"].backend)
    for name in ("quant_type", "exclude_layers", "regional_quantize"):
        assert getattr(ours["quantize_config"], name) == getattr(theirs["quantize_config"], name), name
    assert cachedit_fx.load_configs(str(path), return_dict=False)[0] == ours["cache_config"]


def test_load_configs_names_the_bad_key(tmp_path):
    with pytest.raises(ConfigError, match=r"parallelism_config: only one of .* can be 'auto'"):
        cachedit_fx.load_configs({"parallelism_config": {"ulysses_size": "auto", "ring_size": "auto"}})
    with pytest.raises(ConfigError, match=r"cache config: unknown key\(s\).*bogus"):
        cachedit_fx.load_configs({"cache_config": {"bogus": 1}})


def _settings() -> dict:
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    return {**{f"dynamo.{k}": v for k, v in dynamo.get_config_copy().items()},
            **{f"inductor.{k}": v for k, v in inductor.get_config_copy().items()}}


@pytest.mark.parametrize("kwargs", [{}, {"descent_tuning": False}, {"capture_scalar_outputs": True}])
def test_set_compile_configs_sets_what_cache_dit_sets(kwargs):
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    saved = dynamo.save_config(), inductor.save_config()
    try:
        before = _settings()
        reference.set_compile_configs(**kwargs)
        theirs = _settings()
        dynamo.load_config(saved[0])
        inductor.load_config(saved[1])
        cachedit_fx.set_compile_configs(**kwargs)
        ours = _settings()
    finally:
        dynamo.load_config(saved[0])
        inductor.load_config(saved[1])
    changed = {k for k in theirs if theirs[k] != before[k]}
    assert changed and {k for k in ours if ours[k] != before[k]} == changed
    assert {k: ours[k] for k in changed} == {k: theirs[k] for k in changed}


def test_block_range_is_cache_dits():
    for start in range(-1, 5):
        for end in range(-1, 12):
            for step in range(0, 5):
                assert cachedit_fx.block_range(start, end, step) == reference.block_range(start, end, step), \
                    (start, end, step)


@pytest.mark.slow
def test_cache_dits_flux_patch_functor_then_the_graph_pass():
    """cache-dit's FluxPatchFunctor gives Flux's single blocks a two-stream forward; applied through a
    BlockAdapter, the cache analyses the patched graph and caches the same steps as the unpatched model."""
    from cache_dit.caching.patch_functors import FluxPatchFunctor

    cache = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.6, max_warmup_steps=2)
    cached = []
    for patch in (False, True):
        transformer, inputs = zoo.build_transformer("flux")
        if patch:
            adapter = cachedit_fx.BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                                               forward_pattern=cachedit_fx.ForwardPattern.Pattern_1,
                                               patch_functor=FluxPatchFunctor())
            assert transformer._is_patched
            cachedit_fx.enable_cache(adapter, cache_config=cache, compile=False)
        else:
            cachedit_fx.enable_cache(transformer, cache_config=cache, compile=False)
        with torch.no_grad():
            zoo.denoise(transformer, "flux", inputs, num_steps=8)
        (stats,) = [s for s in cachedit_fx.summary(transformer, logging=False) if s.unmatched is None]
        cached.append(stats.cached_steps)
    assert cached[0] and cached[1] == cached[0]


class CountingFunctor(cachedit_fx.PatchFunctor):
    """A user's functor: records the call and marks the model patched."""

    calls = 0

    def _apply(self, transformer, **kwargs):
        CountingFunctor.calls += 1
        transformer._is_patched = True
        return transformer


def test_patch_functor_is_applied_once_and_only_to_diffusers_models():
    transformer, _ = zoo.build_transformer("flux")
    CountingFunctor.calls = 0
    cachedit_fx.BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                             patch_functor=CountingFunctor())
    with pytest.warns(UserWarning, match="not applied to FluxTransformer2DModel: it is patched already"):
        CountingFunctor().apply(transformer)
    with pytest.warns(UserWarning, match="it does not come from diffusers"):
        CountingFunctor().apply(torch.nn.Linear(2, 2))
    assert CountingFunctor.calls == 1
    with pytest.raises(ConfigError, match=r"BlockAdapter\.patch_functor must be a PatchFunctor.*str"):
        cachedit_fx.BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks, patch_functor="x")


def test_a_registered_adapter_is_found_by_class_name_prefix(monkeypatch):
    monkeypatch.setattr(cachedit_fx.BlockAdapterRegister, "_adapters", {})
    made = []

    @cachedit_fx.BlockAdapterRegister.register("FluxTransformer")
    def flux_adapter(pipe, **kwargs):
        made.append(type(pipe).__name__)
        return cachedit_fx.BlockAdapter(pipe=pipe, transformer=pipe.transformer,
                                        blocks=pipe.transformer.single_transformer_blocks, **kwargs)

    transformer, _ = zoo.build_transformer("flux")
    adapter = cachedit_fx.get_adapter(transformer)
    assert made == ["FakeDiffusionPipeline"] and adapter.blocks is transformer.single_transformer_blocks
    assert cachedit_fx.BlockAdapterRegister.is_supported("FluxTransformer2DModel")
    assert not cachedit_fx.BlockAdapterRegister.is_supported("WanTransformer3DModel")
    assert cachedit_fx.BlockAdapterRegister.supported_pipelines() == (1, ["FluxTransformer"])
    assert cachedit_fx.BlockAdapterRegister.has_separate_cfg("WanPipeline") is False  # a str: no instance name
    assert cachedit_fx.BlockAdapterRegister.has_separate_cfg(zoo.build_pipeline("wan"))


@pytest.fixture
def restores_the_active_attention_backend():
    """diffusers' ``set_attention_backend`` also sets the process-wide active backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def test_set_attn_backend_uses_diffusers_and_refuses_by_name(restores_the_active_attention_backend):
    from diffusers.models.attention_dispatch import AttentionBackendName

    transformer, _ = zoo.build_transformer("flux")
    cachedit_fx.set_attn_backend(transformer, "_native_math")
    processor = transformer.transformer_blocks[0].attn.processor
    assert processor._attention_backend == AttentionBackendName._NATIVE_MATH
    with pytest.raises(ConfigError, match=r"attention_backend must be one of diffusers' backends .*native.*"
                                          r"got 'sage3' \(a cache-dit kernel"):
        cachedit_fx.set_attn_backend(transformer, "sage3")
    with pytest.raises(ConfigError, match=r"attention_backend='flash' cannot be used for FluxTransformer2DModel"):
        cachedit_fx.enable_cache(transformer, attention_backend="flash")


def test_parallelism_options_are_refused_by_field():
    with pytest.raises(ConfigError, match=r"ParallelismConfig.*ulysses_size.*ring_size.*tp_size"):
        cachedit_fx.ParallelismConfig()
    with pytest.raises(ConfigError, match=r"ParallelismConfig\.use_ray.*left at its default.*Ray"):
        cachedit_fx.ParallelismConfig(ulysses_size=2, use_ray=True)
    with pytest.raises(ConfigError, match=r"ParallelismConfig\.ulysses_size.*None or an int >= 1.*-2"):
        cachedit_fx.ParallelismConfig(ulysses_size=-2)
    transformer, _ = zoo.build_transformer("flux")
    with pytest.raises(ConfigError, match=r"parallelism_config needs torch\.distributed initialized"):
        cachedit_fx.enable_cache(transformer, parallelism_config=cachedit_fx.ParallelismConfig(ulysses_size=2))
    assert getattr(transformer, "_parallel_config", None) is None
