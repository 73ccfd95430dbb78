"""FX capture and the pattern pass: block chains, stream patterns and Fn | middle | Bn splits.

Every zoo family is captured once (Dynamo tracing only, no compile) and analysed; the chain found must
be the model's own ModuleLists, and each list's ForwardPattern is what the graph's dataflow says.
"""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cachedit_fx.capture.dynamo import CaptureError, capture
from cachedit_fx.passes.patterns import Unmatched, analyze
from cachedit_fx.passes.split import passthrough_module, segment_module, split_chain
from cachedit_fx import zoo

# family -> the longest chain's lists (ModuleList attribute of the transformer, pattern), in call order.
EXPECTED = {
    "flux": [("transformer_blocks", 1), ("single_transformer_blocks", 1)],  # single blocks keep 2 streams
    "sd3": [("transformer_blocks", 1)],
    "qwenimage": [("transformer_blocks", 1)],
    "wan": [("blocks", 2)],
    "cogvideox": [("transformer_blocks", 0)],
    "pixart": [("transformer_blocks", 2)],  # table says 3; blocks cross-attend to a read-only (B, L, D) text context
    "sana": [("transformer_blocks", 2)],  # table says 3; same cross-attention to the text as PixArt
    "hunyuanvideo": [("transformer_blocks", 0), ("single_transformer_blocks", 0)],  # token refiner stays out
    "ltx": [("transformer_blocks", 2)],
    "dit": [("transformer_blocks", 3)],
    "cogview4": [("transformer_blocks", 0)],
    "lumina2": [("layers", 3)],
    "auraflow": [("joint_transformer_blocks", 1), ("single_transformer_blocks", 3)],
    "chroma": [("transformer_blocks", 1), ("single_transformer_blocks", 3)],
    "hidream": [("double_stream_blocks", 0), ("single_stream_blocks", 3)],
    "mochi": [("transformer_blocks", 0)],
    "allegro": [("transformer_blocks", 2)],
    "zimage": [("layers", 3)],  # noise_refiner (as long, tiny config) is its own chain; the later one wins ties
}

# Forwards that cannot be ONE graph: the backend rewrites one whole graph, so these are reported, not cached.
UNCAPTURABLE = {
    "lumina2": "sequence lengths come from the mask's values (.tolist()) and feed Python control flow",
    "hidream": "MoE routing loops over per-expert token counts read from a tensor (data-dependent)",
}


@functools.lru_cache(maxsize=None)
def _capture_family(name):
    torch.manual_seed(0)
    transformer, kwargs = zoo.build_transformer(name)
    try:
        gm, example_inputs = capture(transformer, kwargs=kwargs)
    except CaptureError as e:
        return transformer, e, None
    return transformer, gm, example_inputs


def captured(name):
    """(transformer, graph, example inputs), captured once per family; raises CaptureError again."""
    transformer, gm, example_inputs = _capture_family(name)
    if isinstance(gm, CaptureError):
        raise gm
    return transformer, gm, example_inputs


def chain_of(name):
    _, gm, _ = captured(name)
    found = analyze(gm)
    assert not isinstance(found, Unmatched), found.reason
    return gm, found[0]


def family_param(name):
    if name in UNCAPTURABLE:
        return pytest.param(name, marks=pytest.mark.xfail(raises=CaptureError, strict=True, reason=UNCAPTURABLE[name]))
    return name


@pytest.mark.slow
@pytest.mark.parametrize("name", [family_param(n) for n in zoo.FAMILY_NAMES])
def test_family_chain_and_patterns(name):
    transformer, gm, _ = captured(name)
    found = analyze(gm)
    assert not isinstance(found, Unmatched), found.reason
    info = found[0]
    expected = [(attr, len(getattr(transformer, attr)), pattern) for attr, pattern in EXPECTED[name]]
    assert [(path, n, int(p)) for path, n, p in info.list_patterns] == expected
    assert [b.name for b in info.blocks] == [f"{attr}.{i}" for attr, n, _ in expected for i in range(n)]
    assert info.pattern == "→".join(str(p) for _, _, p in expected)
    # Every block takes the H stream; only two-stream patterns (0, 1) take E as a stream too.
    pattern_of = dict(EXPECTED[name])
    for bs in info.streams:
        assert "H" in bs.inputs.values(), bs.block.name
        assert ("E" in bs.inputs.values()) == (pattern_of[bs.block.list_path] in (0, 1)), bs.block.name
    assert "H" in info.streams[-1].outputs.values()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(UNCAPTURABLE))
def test_uncapturable_family_is_reported_clearly(name):
    with pytest.raises(CaptureError) as err:
        captured(name)
    message = str(err.value)
    assert type(_capture_family(name)[0]).__name__ in message and "one graph" in message
    assert ".py:" in message  # names the line of the model that breaks the graph


# --- a user-defined DiT: its own block class, an unusual list name, no configuration -------------


class DoomBlock(nn.Module):
    def __init__(self, dim, heads=2, cross=False):
        super().__init__()
        self.heads = heads
        self.ada = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cross = cross
        if cross:
            self.norm_c = nn.LayerNorm(dim)
            self.q_c, self.kv_c, self.proj_c = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _heads(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, cond, text=None):
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).unsqueeze(1).chunk(6, dim=-1)
        q, k, v = self.qkv(self.norm1(x) * (1 + scale1) + shift1).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(b, n, d))
        if self.cross:
            k, v = self.kv_c(text).chunk(2, dim=-1)
            a = F.scaled_dot_product_attention(self._heads(self.q_c(self.norm_c(x))), self._heads(k), self._heads(v))
            x = x + self.proj_c(a.transpose(1, 2).reshape(b, n, d))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DoomDiT(nn.Module):
    def __init__(self, channels=4, dim=32, depth=5, patch=2, cross=False):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.patchify = nn.Conv2d(channels, dim, patch, patch)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_in = nn.Linear(24, dim) if cross else None
        self.layers_of_doom = nn.ModuleList(DoomBlock(dim, cross=cross) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.unpatchify = nn.Linear(dim, patch * patch * channels)

    def forward(self, latents, t, text=None):
        b, c, h, w = latents.shape
        x = self.patchify(latents).flatten(2).transpose(1, 2)
        cond = self.time(t[:, None])
        text = self.text_in(text) if self.text_in is not None else None
        for block in self.layers_of_doom:
            x = block(x, cond, text)
        x = self.unpatchify(self.norm_out(x))
        p = self.patch
        x = x.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)


@pytest.mark.parametrize("cross, pattern", [(False, "3"), (True, "2")])
def test_user_defined_dit_found_without_configuration(cross, pattern):
    torch.manual_seed(0)
    model = DoomDiT(cross=cross).eval()
    kwargs = {"latents": torch.randn(1, 4, 8, 8), "t": torch.rand(1)}
    if cross:
        kwargs["text"] = torch.randn(1, 7, 24)
    gm, _ = capture(model, kwargs=kwargs)
    found = analyze(gm)
    assert not isinstance(found, Unmatched), found.reason
    info = found[0]
    assert [b.name for b in info.blocks] == [f"layers_of_doom.{i}" for i in range(5)]
    assert info.blocks[0].cls is DoomBlock
    assert info.pattern == pattern


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16)),
    nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),  # one attention block, nothing repeated
], ids=["mlp", "single-block"])
def test_no_repeated_blocks_is_unmatched(model):
    gm, _ = capture(model.eval(), args=(torch.randn(1, 6, 16),))
    found = analyze(gm)
    assert isinstance(found, Unmatched)
    assert "no repeated transformer blocks" in found.reason


# --- Fn | middle | Bn ---------------------------------------------------------------------------


class Recorder(torch.fx.Interpreter):
    """Runs the graph and keeps every node's value."""

    def run_node(self, n):
        self.values[n] = value = super().run_node(n)
        return value


@functools.lru_cache(maxsize=None)
def node_values(name):
    _, gm, example_inputs = captured(name)
    rec = Recorder(gm)
    rec.values = {}
    with torch.no_grad():
        rec.run(*example_inputs)
    return rec.values


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "wan", "cogvideox", "pixart", "auraflow"])
def test_split_segments_reproduce_the_middle(name):
    gm, info = chain_of(name)
    values = node_values(name)
    n = info.n_blocks
    for fn, bn in [(1, 0), (2, 1), (1, n - 2), (n - 3, 2)]:
        split = split_chain(gm, info, fn, bn)
        blocks = info.blocks
        # The three segments partition the chain at block boundaries.
        assert split.fn_nodes[0] is blocks[0].nodes[0] and split.fn_nodes[-1] is blocks[fn - 1].nodes[-1]
        assert split.middle_nodes[-1] is blocks[n - bn - 1].nodes[-1]
        assert split.bn_nodes[-1] is blocks[-1].nodes[-1] if bn else split.bn_nodes == []
        assert "H" in split.output_roles.values()
        middle_in = [values[i] for i in split.middle_inputs]
        with torch.no_grad():
            full = segment_module(gm, split.middle_nodes, split.middle_inputs, split.middle_outputs)(*middle_in)
            skipped = passthrough_module(gm, split)(*middle_in)
        assert len(full) == len(skipped) == len(split.middle_outputs)
        for out, got, passed in zip(split.middle_outputs, full, skipped):
            assert torch.equal(got, values[out]), f"F{fn}B{bn}: middle output {out.name} differs"
            assert passed.shape == got.shape


@pytest.mark.parametrize("fn, bn", [(0, 0), (1, -1), (7, 2), (9, 0), (3, 6)])
def test_invalid_split_names_the_chain_length(fn, bn):
    gm, info = chain_of("flux")
    assert info.n_blocks == 8
    with pytest.raises(ValueError, match=r"of 8 blocks"):
        split_chain(gm, info, fn, bn)


def test_whole_chain_in_fn_and_bn_leaves_an_empty_middle():
    gm, info = chain_of("flux")
    split = split_chain(gm, info, 3, 5)
    assert split.middle_nodes == [] and split.middle_outputs == []
