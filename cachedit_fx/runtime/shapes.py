"""Shape templates: a tensor shape whose sizes may be symbolic (a capture with dynamic dims) written as
JSON-able size expressions, and evaluated for the sizes of a concrete call.

The cache state is allocated per *concrete* shape: a graph compiled for dynamic sizes (a torch.compile
recompile for a new resolution, an exported package with ``dynamic_shapes``) sizes its reference and
ladders from each call's inputs. Both the backend and a loaded export package use these templates.
"""
from __future__ import annotations

import math

import sympy
import torch

from ..errors import NoCacheableChain

# How a size expression of a shape template is evaluated: the sympy functions symbolic shapes use.
_OPS = {"Add": lambda *a: sum(a), "Mul": lambda *a: math.prod(a), "FloorDiv": lambda a, b: a // b,
        "CeilToInt": math.ceil, "Max": max, "Min": min, "PythonMod": lambda a, b: a % b,
        "Mod": lambda a, b: a % b, "Pow": pow, "IntTrueDiv": lambda a, b: a / b,
        "FloatTrueDiv": lambda a, b: a / b, "floor": math.floor, "ceiling": math.ceil, "FloorToInt": math.floor}


def _expression(e: sympy.Expr):
    """A size expression as JSON: an int, {"sym": name}, or {"op": sympy function, "args": [...]}."""
    if e.is_Integer:
        return int(e)
    if e.is_Symbol:
        return {"sym": str(e)}
    op = type(e).__name__
    if op not in _OPS:
        raise NoCacheableChain(f"a dynamic size of the cache state is {e} ({op}), which cannot be sized from a "
                               "call's inputs; keep that dimension static")
    return {"op": op, "args": [_expression(a) for a in e.args]}


def _value(expr, env: dict[str, int]) -> int:
    if isinstance(expr, int):
        return expr
    if "sym" in expr:
        return env[expr["sym"]]
    return _OPS[expr["op"]](*(_value(a, env) for a in expr["args"]))


def template(shape) -> list:
    """A shape as JSON: ints, and size expressions where the shape is symbolic.

    Raises:
        NoCacheableChain: a size is an expression no call can be evaluated for.
    """
    return [d if isinstance(d, int) else _expression(d.node.expr) for d in shape]


def is_dynamic(template: list) -> bool:
    return any(not isinstance(d, int) for d in template)


def plain_symbols(values: list):
    """(input index, dim, size) for every size of the tensors in ``values`` that is a plain symbol, and
    (input index, None, value) for every input that is itself a plain symbolic int."""
    for i, v in enumerate(values):
        if isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
            yield i, None, v
        elif isinstance(v, torch.Tensor):
            for d, size in enumerate(v.shape):
                if not isinstance(size, int) and size.node.expr.is_Symbol:
                    yield i, d, size


def symbols_of(values: list) -> dict[str, list]:
    """symbol -> [input index, dim] where it first appears (dim None: the input is the size itself)."""
    out: dict[str, list] = {}
    for i, d, size in plain_symbols(values):
        out.setdefault(str(size.node.expr), [i, d])
    return out


def symbol_values(symbols: dict[str, list], inputs) -> dict[str, int]:
    """Each symbol's value in a concrete call whose inputs are ``inputs``."""
    return {s: int(inputs[i]) if d is None else inputs[i].shape[d] for s, (i, d) in symbols.items()}


def evaluate(template: list, symbols: dict[str, list], inputs) -> tuple[int, ...]:
    """The template's concrete shape for a call whose inputs are ``inputs``."""
    env = symbol_values(symbols, inputs)
    return tuple(int(_value(d, env)) for d in template)
