"""Shape templates (``runtime.shapes``): a symbolic state shape written as JSON and evaluated for a call."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from cachedit_fx.runtime.shapes import evaluate, symbols_of, template


def test_a_patchified_token_count_is_evaluated_for_each_call():
    """Wan's tokens under dynamic sizes: ``frames * (h // 2) * (w // 2)``, a product of three factors."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * 2 + [DimDynamic.DYNAMIC] * 3)
    latent = mode.from_tensor(torch.empty(1, 16, 2, 8, 8), symbolic_context=context)
    frames, height, width = latent.shape[2:]
    shape = template((1, frames * (height // 2) * (width // 2), 32))
    symbols = symbols_of([latent])
    assert evaluate(shape, symbols, [torch.empty(1, 16, 2, 8, 8)]) == (1, 32, 32)
    assert evaluate(shape, symbols, [torch.empty(1, 16, 3, 10, 6)]) == (1, 45, 32)
