"""Islands (cachedit_fx/capture/islands.py): submodules that break Dynamo's graph inside every block are found
from one capture (the failing frame's stack, or the module stack of data-dependent nodes), made opaque
through the ``cachedit::island`` custom op, and the whole forward then traces as one graph."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cachedit_fx as cf
from cachedit_fx.capture import islands
from cachedit_fx.install.hook import cache_hook
from cachedit_fx import zoo

D = 8


class Router(nn.Module):
    """A MoE-style routing loop: a host sync and a Python loop over data-dependent counts."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D)])

    def forward(self, x):
        flat = x.reshape(-1, D)
        choice = (flat.sum(-1) > 0).long()
        out = torch.zeros_like(flat)
        for e, n in enumerate(choice.bincount(minlength=2).cpu().tolist()):
            if n:
                rows = (choice == e).nonzero().flatten()
                out[rows] = self.experts[e](flat[rows])
        return out.reshape(x.shape)


class Dropper(nn.Module):
    """Attention over the unmasked tokens only (torch.nonzero: a data-dependent shape inside), output
    padded back to full length; also returns its input unchanged (an alias the op must copy)."""

    def forward(self, x, mask, scale=1.0):
        keep = torch.nonzero(mask[0]).flatten()
        kept = x[:, keep]
        attn = torch.softmax(kept @ kept.transpose(-1, -2) * scale, dim=-1) @ kept
        out = torch.zeros_like(x)
        out[:, keep] = attn
        return {"out": out, "same": x}


class Block(nn.Module):
    def __init__(self, sync_in_block: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.drop = Dropper()
        self.route = Router()
        self.sync_in_block = sync_in_block

    def forward(self, h, mask):
        if self.sync_in_block and h.sum().item() > 1e9:  # a break in the block's own forward
            h = h * 2
        got = self.drop(self.norm(h), mask, scale=0.5)
        return h + got["out"] + self.route(h) + 0.1 * got["same"]


class Toy(nn.Module):
    def __init__(self, sync_in_block: bool = False):
        super().__init__()
        self.proj_in = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(sync_in_block) for _ in range(3)])
        self.proj_out = nn.Linear(D, D)

    def forward(self, hidden_states, mask):
        h = self.proj_in(hidden_states)
        for block in self.blocks:
            h = block(h, mask)
        return self.proj_out(h)


def toy_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 6, D, generator=g), torch.tensor([[1, 1, 0, 1, 0, 1]], dtype=torch.bool)


def graphs_of(fn, *args, **kwargs):
    """The graphs Dynamo makes of ``fn`` (no fullgraph: a break gives more graphs) and their reasons."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # About Dynamo's caches: the graphs and breaks counted here depend on what Dynamo remembers of the
    # blocks' and submodules' own code objects (shared by every instance of their classes), not only the
    # forward's. A private copy of the forward does not cover those: HiDream's capture before islands
    # compiles each block's frame after its break until that code hits recompile_limit (8) and runs
    # eagerly from then on, and the capture after islands then splits the blocks over 6 graphs. So count
    # from empty caches, and leave them empty.
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=record, dynamic=False)(*args, **kwargs)
    torch._dynamo.reset()
    return graphs, out


def breaks(graphs) -> list[str]:
    return [g.compile_subgraph_reason.reason for g in graphs
            if getattr(g, "compile_subgraph_reason", None) is not None and g.compile_subgraph_reason.graph_break]


def test_toy_islands_found_by_stack_and_dataflow_then_one_graph():
    torch.manual_seed(0)
    model = Toy().eval()
    x, mask = toy_inputs()
    with torch.no_grad():
        ref = model(x, mask)
    graphs, _ = graphs_of(model, x, mask)
    assert breaks(graphs), "the toy model should break Dynamo's graph before islands"

    found = islands.find(model, model.forward, (x, mask), {})
    try:
        # Router fails the capture (stack); Dropper traces with an unbacked nonzero (dataflow).
        assert sorted(n for n, m in model.named_modules() if m in found) == sorted(
            f"blocks.{i}.{c}" for i in range(3) for c in ("drop", "route"))
        graphs, out = graphs_of(model, x, mask)
        assert len(graphs) == 1 and not breaks(graphs), breaks(graphs)
        assert torch.equal(out, ref)
        # Each island is one node; the expert linears are inside it, not in the graph.
        targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
        assert sum("island_Router" in t for t in targets) == 3
        assert sum("island_Dropper[softmax]" in t for t in targets) == 3
        assert not any("nonzero" in t or "bincount" in t for t in targets)
    finally:
        for m in found:
            islands.uninstall(m)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_island_output_equals_the_module_exactly():
    torch.manual_seed(0)
    model = Toy().eval()
    x, mask = toy_inputs()
    drop, route = model.blocks[1].drop, model.blocks[1].route
    with torch.no_grad():
        before = drop(x, mask, scale=0.5), route(x)
    found = islands.find(model, model.forward, (x, mask), {})
    try:
        assert drop in found and route in found
        with torch.no_grad():
            got = drop(x, mask, scale=0.5), route(x)
            compiled = torch.compile(lambda a, m: (drop(a, m, scale=0.5), route(a)), backend="aot_eager",
                                     fullgraph=True, dynamic=False)(x, mask)
        for after in (got, compiled):
            assert torch.equal(after[0]["out"], before[0]["out"]) and torch.equal(after[1], before[1])
            assert torch.equal(after[0]["same"], x)
        # The op may not return an alias of its input: the pass-through output is a copy.
        assert got[0]["same"].data_ptr() != x.data_ptr()
    finally:
        for m in found:
            islands.uninstall(m)


def test_never_the_block_or_the_transformer():
    """A break in the block's own forward is not an island: the innermost module forward on the stack
    is the block, which is not strictly inside a block."""
    model = Toy(sync_in_block=True).eval()
    x, mask = toy_inputs()
    found = islands.find(model, model.forward, (x, mask), {})
    try:
        assert all(type(m) is not Block and m is not model for m in found)
        assert not found, [type(m).__name__ for m in found]
    finally:
        for m in found:
            islands.uninstall(m)


def _call_kwargs(name):
    """The transformer kwargs of one real pipeline call (CFG batch and masks as the pipeline builds them)."""
    pipe = zoo.build_pipeline(name)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    zoo.run_pipeline(pipe, name, num_inference_steps=2)
    hook.remove()
    return pipe.transformer, calls[0]


# The class names are what the dataflow / stack analysis is expected to find; nothing in the package
# names them.
@pytest.mark.slow
@pytest.mark.parametrize("name, expected, count", [("mochi", "MochiAttention", 6), ("hidream", "MOEFeedForwardSwiGLU", 8)])
def test_zoo_islands_and_one_graph_for_the_blocks(name, expected, count):
    transformer, kwargs = _call_kwargs(name)
    with torch.no_grad():
        ref = transformer(**kwargs)
    before, _ = graphs_of(transformer.forward, **kwargs)
    found = islands.find(transformer, transformer.forward, (), kwargs)
    try:
        assert {type(m).__name__ for m in found} == {expected} and len(found) == count
        names = [n for n, m in transformer.named_modules() if m in found]
        assert all(n.split(".")[1].isdigit() and len(n.split(".")) > 2 for n in names), names
        graphs, out = graphs_of(transformer.forward, **kwargs)
        assert torch.equal(out[0], ref[0])
        with_blocks = [g for g in graphs if any("island_" in str(n.target) for n in g.graph.nodes)]
        assert len(with_blocks) == 1, f"{name}: blocks split over {len(with_blocks)} graphs"
        assert sum("island_" in str(n.target) for n in with_blocks[0].graph.nodes) == count
        if name == "mochi":
            assert len(graphs) == 1 and not breaks(graphs), breaks(graphs)
            assert len(before) > 1
        else:
            # HiDream's unpatchify reads sizes with .item() after the blocks: that break stays (outside
            # the chain); none is left inside the blocks.
            assert len(breaks(graphs)) == 1 and "item()" in breaks(graphs)[0], breaks(graphs)
            assert len(breaks(before)) > 1
    finally:
        for m in found:
            islands.uninstall(m)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mochi", "hidream"])
def test_islands_through_cond_eager_and_aot_eager(name):
    """enable_cache on the bare transformer: the islands sit inside torch.cond's full branch; eager and
    aot_eager inner compilers make the same decisions and outputs."""
    transformer, inputs = zoo.build_transformer(name)
    cfg = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.8, max_warmup_steps=2)
    with torch.no_grad():
        ref, _ = zoo.denoise(transformer, name, inputs, num_steps=6)
    runs = {}
    for inner in ("eager", "aot_eager"):
        try:
            cf.enable_cache(transformer, cache_config=cfg, inner=inner)
            latent, _ = zoo.denoise(transformer, name, inputs, num_steps=6)
            rows = [r for r in cf.summary(transformer, details=True) if r.unmatched is None]
            assert len(cache_hook(transformer).islands) > 0
        finally:
            cf.disable_cache(transformer)
        runs[inner] = latent, [i in r.cached_steps for r in rows for i in range(r.steps)]
    assert sum(runs["eager"][1]) > 0, runs
    assert runs["eager"][1] == runs["aot_eager"][1]
    torch.testing.assert_close(runs["aot_eager"][0], runs["eager"][0], rtol=1e-4, atol=1e-4)
    assert not torch.equal(runs["eager"][0], ref)
    with torch.no_grad():
        assert torch.equal(zoo.denoise(transformer, name, inputs, num_steps=6)[0], ref)
    assert not any("forward" in m.__dict__ for m in transformer.modules())


@pytest.mark.slow
def test_enable_cache_makes_no_islands_under_grad_then_does_for_inference():
    """Islands have no backward and caching is inference-only: a first call with grad on runs uncached
    (one warning) and leaves the model alone; the first no-grad call makes the islands and caches."""
    transformer, kwargs = zoo.build_transformer("hidream")
    cf.enable_cache(transformer, cache_config=dict(Fn_compute_blocks=1, residual_diff_threshold=0.8),
                    compile=False)
    try:
        with pytest.warns(UserWarning, match="grad mode is on"):
            transformer(**kwargs)
        assert cache_hook(transformer).islands == []
        assert not any(hasattr(m, "_cachedit_island") for m in transformer.modules())
        with torch.no_grad():
            transformer(**kwargs)
        assert len(cache_hook(transformer).islands) == 8 and len(cache_hook(transformer).handle.chains) == 1
    finally:
        cf.disable_cache(transformer)
    assert not any(hasattr(m, "_cachedit_island") for m in transformer.modules())
