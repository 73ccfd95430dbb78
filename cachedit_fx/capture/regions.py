"""Hierarchical compilation: each repeated block as a compiled region (torch's ``nested_compile_region``),
so that Dynamo traces one block of each kind and every other call of that kind reuses it, and Inductor
lowers the body once and calls it from everywhere (Fn, the full branch of the cond, Bn).

In the graph a marked block is one ``invoke_subgraph`` node (its body a submodule of the graph) and a
``getitem`` per output, all under the block's module path; :mod:`cachedit_fx.passes.regions` reads them.

Marking swaps each block's class for a subclass of it whose ``forward`` is the region (one subclass, and
one wrapper code object, per block class; the original class stays untouched, so other instances and other
models are not affected). A region bound per instance (``block.forward = MethodType(...)``) is not enough:
torch 2.13 reuses the first block's body for the others with the *first block's weights* as operands (every
block then computes with block 0's weights), while a region found on the class reads each block's own. Dynamo
keys region reuse, and caps it at ``max_reuse_entries`` (8), per wrapper *code object*, so classes that
shared one wrapper would count their variants together. The wrapper returns its tensors as fresh contiguous
copies: a region may not return an input or two views of one buffer (Flux's single block returns two slices
of one tensor), and the same strides at every call site let all calls share one body. A block that already
has an instance ``forward`` (another library's hook, an island of ours) is left as it is: it traces inline,
as without regions.
"""
from __future__ import annotations

import itertools
import types
import weakref

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_MARK = "_cachedit_region_of"  # set on a marked block: the class it had before
# Below this many repeated blocks the blocks compile inline: compiling each costs little more than compiling
# one, and a region call costs the host ~20 us a block per call and keeps Inductor from fusing across block
# boundaries (measured on a 6-block Flux: a computed step 5 % slower than the inline graph's).
MIN_BLOCKS = 8
_REGION_CLASSES: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()


def _fresh(value):
    return value.clone(memory_format=torch.contiguous_format) if isinstance(value, torch.Tensor) else value


def _calling(original):
    def forward(self, *args, **kwargs):
        return pytree.tree_map(_fresh, original(self, *args, **kwargs))
    return forward


def _region_class(cls: type) -> type:
    """The subclass of ``cls`` whose ``forward`` is a compiled region: a wrapper with a code object of its own
    (so Dynamo's reuse cache counts this class's variants alone) calling ``cls.forward``. It keeps ``cls``'s
    name, so logs and module stacks read as before."""
    if cls not in _REGION_CLASSES:
        shared = _calling(cls.forward)
        code = shared.__code__.replace(co_name=f"{cls.__name__}_region", co_qualname=f"{cls.__qualname__}_region")
        fn = types.FunctionType(code, shared.__globals__, code.co_name, None, shared.__closure__)
        _REGION_CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": torch.compiler.nested_compile_region(fn), "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "region_of": cls})
    return _REGION_CLASSES[cls]


def model_class(cls: type | None) -> type | None:
    """The model's own block class of ``cls``: the class a region class was made from, else ``cls``."""
    return cls.__dict__.get("region_of", cls) if cls is not None else None


def block_lists(module: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The repeated block lists of ``module`` by path: ModuleLists of >= 2 entries of one class of the
    model's own (not a ``torch.nn`` layer), outside the entries of another such list (a feed-forward's
    ``net``, an attention's ``to_out`` mix classes and are never lists of blocks)."""
    found: dict[str, torch.nn.ModuleList] = {}
    for name, m in module.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) < 2:
            continue
        classes = {type(b) for b in m}
        cls = next(iter(classes))
        if len(classes) != 1 or cls.__module__.startswith("torch.nn"):
            continue
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        found[name] = m
    return found


def repeated_blocks(module: torch.nn.Module) -> int:
    """How many blocks ``module``'s repeated block lists hold together."""
    return sum(len(blocks) for blocks in block_lists(module).values())


def mark(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Mark every block of ``module``'s repeated block lists as a compiled region.

    Args:
        module: a transformer (any module with lists of repeated blocks).

    Returns:
        The blocks marked (already marked ones and blocks with an instance ``forward`` of their own are
        skipped); :func:`unmark` undoes it.
    """
    marked = []
    for blocks in block_lists(module).values():
        for block in blocks:
            if "forward" in block.__dict__ or is_marked(block):
                continue  # another hook's: it runs inline
            if holds_tensor_subclass(block):
                continue  # torch 2.13's invoke_subgraph has no rule for subclass operands (torchao weights)
            original = type(block)
            block.__class__ = _region_class(original)
            block.__dict__[_MARK] = original
            marked.append(block)
    return marked


def holds_tensor_subclass(module: torch.nn.Module) -> bool:
    """Whether a parameter or buffer of ``module`` is a wrapper tensor subclass (torchao's quantized
    weights): those blocks run inline, not as regions."""
    return any(is_traceable_wrapper_subclass(t) for t in itertools.chain(module.parameters(), module.buffers()))


def unmark(module: torch.nn.Module) -> int:
    """Undo :func:`mark` on ``module``'s blocks; returns how many were unmarked."""
    count = 0
    for block in module.modules():
        original = block.__dict__.pop(_MARK, None)
        if original is not None:
            block.__class__ = original
            count += 1
    return count


def is_marked(block: torch.nn.Module) -> bool:
    return _MARK in block.__dict__
