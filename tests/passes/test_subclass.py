"""Tensor-subclass weights across the cache decision (passes/subclass.py): torchao's quantized weights
flatten into their plain tensors and rebuild exactly; after ``apply`` no cond takes a subclass operand
and the rewritten graph computes what the quantized model computes; a subclass that cannot be flattened
is named in the reason the passes return (the callers compile uncached with one warning)."""
from __future__ import annotations

import operator

import pytest
import torch

from cachedit_fx.capture.dynamo import capture
from cachedit_fx.config import DBCacheConfig, PassSettings
from cachedit_fx.errors import NoCacheableChain
from cachedit_fx.passes import apply
from cachedit_fx.passes.subclass import flatten_subclass_operands, flatten_value, is_user_subclass, rebuild

from tests.helpers.tinydit import latent, tiny

quantization = pytest.importorskip("torchao.quantization", reason="torchao 0.18.0 (pip install 'cachedit-fx[quant]')")

CONFIGS = {  # the torchao 0.18.0 configs that run on a CPU (IntxWeightOnlyConfig has no set_inductor_config)
    "int8 weight-only": lambda: quantization.Int8WeightOnlyConfig(set_inductor_config=False),
    "int8 dynamic": lambda: quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
    "float8 weight-only": lambda: quantization.Float8WeightOnlyConfig(set_inductor_config=False),
    "intx weight-only": lambda: quantization.IntxWeightOnlyConfig(),
}


def quantized_tiny(config: str):
    model = tiny()
    quantization.quantize_(model.transformer_blocks, CONFIGS[config]())  # the blocks (the time embedding has K=1)
    return model


def _conds(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_quantized_weights_flatten_and_rebuild_exactly(config):
    weight = quantized_tiny(config).transformer_blocks[1].mlp.weight
    assert is_user_subclass(weight) and weight.data_ptr() == 0
    leaves, spec = flatten_value(weight)
    assert leaves and all(type(leaf) is torch.Tensor for leaf in leaves) and spec.cls is type(weight)
    back = rebuild(spec, iter(leaves))
    assert type(back) is type(weight) and back.shape == weight.shape
    assert all(a is b for a, b in zip(flatten_value(back)[0], leaves))
    x = torch.randn(3, weight.shape[1])
    torch.testing.assert_close(torch.nn.functional.linear(x, back), torch.nn.functional.linear(x, weight),
                               rtol=0, atol=0)


@pytest.mark.parametrize("config", ["int8 weight-only", "float8 weight-only"])
def test_apply_passes_no_subclass_to_a_cond_and_computes_the_quantized_model(config):
    model = quantized_tiny(config)
    args = (latent(), torch.tensor([1.0]))
    gm, example_inputs = capture(model, args)
    result = apply(gm, PassSettings(DBCacheConfig(Fn_compute_blocks=1, max_warmup_steps=1)))
    assert result.modified, result.unmatched
    assert result.flattened_subclasses and set(result.flattened_subclasses) == {type(
        model.transformer_blocks[1].mlp.weight).__name__}
    (cond,) = _conds(result.graph_module)
    assert not any(is_user_subclass(o.meta.get("example_value")) for o in cond.args[3])
    states = [t for c in result.chains for t in c.state.ordered()]
    with torch.no_grad():  # the first call computes every block: the quantized model's output
        torch.testing.assert_close(result.graph_module(*example_inputs, *states), (model(*args),), rtol=0, atol=0)


class Sealed(torch.Tensor):
    """A wrapper subclass whose flatten fails: the passes cannot hand it to a cond as plain tensors."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Sealed) else t  # noqa: E731
        return func(*map(unwrap, args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __tensor_flatten__(self):
        raise RuntimeError("sealed")

    @staticmethod
    def __tensor_unflatten__(inner, ctx, size, stride):
        return Sealed(inner["inner"])


def _cond_graph(weight) -> torch.fx.GraphModule:
    """``cond(pred, linear(x, w), x, (x, w))`` as a hand-made graph whose weight placeholder holds ``weight``."""
    def branch(use):
        g = torch.fx.Graph()
        x, w = g.placeholder("x"), g.placeholder("w")
        g.output((g.call_function(torch.nn.functional.linear, (x, w)) if use else g.call_method("clone", (x,)),))
        return torch.fx.GraphModule(torch.nn.Module(), g)

    root = torch.nn.Module()
    root.true_branch, root.false_branch = branch(True), branch(False)
    g = torch.fx.Graph()
    pred, x, w = g.placeholder("pred"), g.placeholder("x"), g.placeholder("w")
    w.meta["example_value"] = weight
    x.meta["example_value"] = torch.zeros(2, 2)
    out = g.call_function(torch.ops.higher_order.cond, (pred, g.get_attr("true_branch"), g.get_attr("false_branch"),
                                                        (x, w)))
    g.output(g.call_function(operator.getitem, (out, 0)))
    return torch.fx.GraphModule(root, g)


def test_a_subclass_that_cannot_be_flattened_is_named():
    with pytest.raises(NoCacheableChain, match=r"tests\.passes\.test_subclass\.Sealed.*cannot be flattened.*sealed"):
        flatten_subclass_operands(_cond_graph(Sealed(torch.eye(2))))


def test_a_flattened_cond_runs_eagerly_with_the_rebuilt_weight():
    weight = quantized_tiny("int8 weight-only").transformer_blocks[0].mlp.weight
    gm = _cond_graph(weight)
    assert flatten_subclass_operands(gm) == [type(weight).__name__]
    x = torch.randn(3, weight.shape[1])
    for pred in (True, False):
        want = torch.nn.functional.linear(x, weight) if pred else x
        torch.testing.assert_close(gm(torch.tensor(pred), x, weight), want, rtol=0, atol=0)

