"""What the install reads off a call's arguments (install/calls.py), on every call of a compiled model."""
import functools
import inspect

import numpy as np
import pytest
import torch

from cachedit_fx.install import calls
from cachedit_fx.install.calls import FloatTimestep, parameter_names



class Model:
    def forward(self, hidden_states, timestep=None, **kwargs):
        return hidden_states

    def varargs(*args):
        return args


def test_parameter_names_drop_a_bound_methods_instance_and_keep_a_leading_star_args():
    m = Model()
    assert parameter_names(m.forward) == ("hidden_states", "timestep", "kwargs")
    assert parameter_names(Model.forward) == ("self", "hidden_states", "timestep", "kwargs")
    assert parameter_names(m.varargs) == ("args",)
    assert parameter_names(functools.partial(Model.forward, m)) == ("hidden_states", "timestep", "kwargs")


def test_parameter_names_are_found_once_per_function(monkeypatch):
    m = Model()
    parameter_names(m.forward)
    monkeypatch.setattr(calls.inspect, "signature", lambda f: pytest.fail("signature read again"))
    assert parameter_names(Model().forward) == ("hidden_states", "timestep", "kwargs")


def test_a_call_without_a_float_reads_no_signature(monkeypatch):
    monkeypatch.setattr(calls.inspect, "signature", lambda f: pytest.fail("signature read for a tensor-only call"))
    x = torch.zeros(2)
    assert FloatTimestep().convert(Model().forward, (x,), {"timestep": torch.ones(1)}) is None


@pytest.mark.parametrize("value", [0.5, np.float64(0.5)])
def test_a_float_timestep_is_passed_as_a_tensor(value):
    x = torch.zeros(2)
    args, kwargs, name = FloatTimestep().convert(Model().forward, (x, value), {})
    assert name == "timestep" and kwargs == {}
    assert args[0] is x and isinstance(args[1], torch.Tensor) and args[1].item() == 0.5
