"""Captures keep to themselves: capture, trace (both kinds) and islands.find leave a model compiled before
them alone."""
from __future__ import annotations

import torch

from cachedit_fx.capture import islands
from cachedit_fx.capture.dynamo import capture, trace

from tests.helpers.tinydit import latent, tiny


def test_captures_leave_other_compiled_models_alone():
    """capture / trace (both kinds) / islands.find never reset Dynamo: a model compiled before them
    keeps its compiled code (no second backend call)."""
    compiled_model, other = tiny(), tiny()
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    compiled = torch.compile(compiled_model, backend=counting, fullgraph=True, dynamic=False)
    args = (latent(), torch.tensor([1.0]))
    with torch.no_grad():
        compiled(*args)
        capture(other, args)
        assert len(trace(other.forward, args, fullgraph=False).graphs) == 1
        assert islands.find(other, other.forward, args, {}) == []
        compiled(*args)
    assert len(calls) == 1
