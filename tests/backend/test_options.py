"""Backend options: unknown options and keys, bad values and Fn/Bn that do not fit fail the compile by
name; TensorRT's inner compiler where it is installed; a model with no block chain compiles uncached
with one warning."""
from __future__ import annotations

import warnings

import pytest
import torch

from cachedit_fx import zoo
from cachedit_fx.config import DBCacheConfig
from cachedit_fx.runtime.handle import CacheHandle, handles_for

from tests.helpers.dynamo import compile_own


class _TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        return self.net(x) + x


def _compile_call(module, options, *args, **kwargs):
    compiled = compile_own(module, backend="cachedit", options=options, fullgraph=True, dynamic=False)
    with torch.no_grad():
        return compiled(*args, **kwargs)


def test_unknown_option_raises():
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"unknown option.*'fn_compute'"):
        _compile_call(_TinyMLP(), dict(fn_compute=2), torch.randn(2, 8))


def test_unknown_cache_config_key_raises():
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"unknown key.*'threshold'"):
        _compile_call(_TinyMLP(), dict(cache_config=dict(threshold=0.5)), torch.randn(2, 8))


def test_nan_threshold_raises():
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"residual_diff_threshold.*finite"):
        _compile_call(_TinyMLP(), dict(cache_config=dict(residual_diff_threshold=float("nan"))), torch.randn(2, 8))


def test_nan_threshold_set_after_construction_raises():
    cfg = DBCacheConfig()
    cfg.residual_diff_threshold = float("nan")  # a mutable dataclass: skipped __post_init__'s check
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"residual_diff_threshold.*finite"):
        _compile_call(_TinyMLP(), dict(cache_config=cfg), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"residual_diff_threshold.*finite"):
        CacheHandle(DBCacheConfig(), None).configure(cfg)


def test_tensorrt_without_torch_tensorrt_says_how_to_install():
    try:
        import torch_tensorrt  # noqa: F401
        pytest.skip("torch_tensorrt is installed")
    except Exception:
        pass
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"pip install"):
        _compile_call(_TinyMLP(), dict(inner="tensorrt"), torch.randn(2, 8))


def test_tensorrt_inner_makes_the_eager_decisions():
    """With torch-tensorrt and a GPU: the TensorRT-compiled graph caches the steps the eager one does."""
    pytest.importorskip("torch_tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from cachedit_fx.runtime.handle import handles_for

    transformer, inputs = zoo.build_transformer("flux")
    transformer = transformer.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    cache = dict(Fn_compute_blocks=1, residual_diff_threshold=0.6, max_warmup_steps=2)
    runs = {}
    for inner in ("eager", "tensorrt"):
        compiled = compile_own(transformer, backend="cachedit", dynamic=False,
                               options=dict(cache_config=cache, inner=inner))
        _, outs = zoo.denoise(transformer, "flux", inputs, num_steps=8, call=compiled)
        log = handles_for(transformer)[-1].chains[0].state.tensors["cached_log"][0, :8, 0].tolist()
        runs[inner] = (outs, log)
    assert any(runs["eager"][1]) and runs["tensorrt"][1] == runs["eager"][1]
    for a, b in zip(runs["tensorrt"][0], runs["eager"][0]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_fn_plus_bn_larger_than_chain_raises_naming_chain():
    transformer, inputs = zoo.build_transformer("sd3")  # one chain: transformer_blocks, 4 blocks
    opts = dict(cache_config=dict(Fn_compute_blocks=3, Bn_compute_blocks=2), inner="eager")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        _compile_call(transformer, opts, **inputs)
    msg = str(info.value)
    assert "transformer_blocks" in msg and "4" in msg and "Fn_compute_blocks=3" in msg, msg


# ----------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("inner", ["aot_eager", "eager"])
def test_unmatched_model_compiles_uncached_with_one_warning(inner):
    torch.manual_seed(0)
    mlp = _TinyMLP().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = mlp(x)
    compiled = compile_own(mlp, backend="cachedit", options=dict(inner=inner), fullgraph=True, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = [compiled(x) for _ in range(3)]
    ours = [str(w.message) for w in caught if "cachedit" in str(w.message)]
    assert len(ours) == 1, ours
    assert "uncached" in ours[0], ours
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    handles = handles_for(mlp)
    assert handles and all(not h.chains for h in handles)
