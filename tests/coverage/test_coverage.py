"""The coverage matrix: every transformer class in diffusers is listed, the shipped matrix agrees with a
fresh run for the classes that run in seconds, supported_pipelines() / supported_matrix() and
docs/coverage.md come from it, and a model written after this code, under names of its own, caches."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cachedit_fx as cf
from cachedit_fx.coverage import catalog, document, matrix

DATA = document.read_json()
ROWS = {r["name"]: r for r in DATA["classes"]}
CLASSES = {c.__name__: c for c in catalog.transformer_classes()}
# Classes that cache in a fresh run within a few seconds each, outside the zoo (test_zoo / test_api
# run the zoo's 18 families through the same paths).
FAST = sorted(n for n, r in ROWS.items() if r["status"] == matrix.CACHES and not (r["layout"] or "").startswith("zoo:")
              and r["seconds"] < 6.0)


def test_the_matrix_lists_every_transformer_class_of_the_installed_diffusers():
    import diffusers

    assert DATA["versions"]["diffusers"] == diffusers.__version__
    assert set(ROWS) == set(CLASSES)
    assert all(r["reason"] for r in DATA["classes"] if r["status"] != matrix.CACHES)
    counts = document.summary_counts(DATA["classes"])
    assert counts == DATA["counts"] and counts["cache"] >= 0.9 * counts["dits"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST)
def test_a_fresh_run_agrees_with_the_shipped_matrix(name):
    row = matrix.run_class(CLASSES[name], backend=False)
    shipped = ROWS[name]["enable_cache"]
    assert row.status == matrix.CACHES, row.reason
    assert (row.enable_cache.chain, row.enable_cache.pattern) == (shipped["chain"], shipped["pattern"])
    assert row.enable_cache.cached_steps == shipped["cached_steps"] and row.enable_cache.cached_steps
    assert row.enable_cache.rel_l1 == pytest.approx(shipped["rel_l1"], rel=1e-3, abs=1e-5)


@pytest.mark.slow
def test_the_backend_path_agrees_with_the_shipped_matrix():
    name = "SkyReelsV2Transformer3DModel" if "SkyReelsV2Transformer3DModel" in FAST else FAST[0]
    row = matrix.run_class(CLASSES[name], backend=True)
    assert row.backend.status == ROWS[name]["backend"]["status"] == matrix.CACHES
    assert row.backend.chain == ROWS[name]["backend"]["chain"]


def test_supported_pipelines_and_matrix_come_from_the_shipped_run():
    rows = cf.supported_matrix()
    assert [r["name"] for r in rows] == [r["name"] for r in DATA["classes"]]
    caching = {r["name"] for r in rows if r["status"] == "caches"}
    count, names = cf.supported_pipelines()
    assert set(names) == {p for r in rows if r["name"] in caching for p in r["pipelines"]} and count == len(names)
    assert "FluxPipeline" in names and "WanPipeline" in names


def test_docs_coverage_is_generated_from_the_shipped_matrix():
    from cachedit_fx.coverage.__main__ import COMMAND

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "coverage.md")
    with open(path) as f:
        assert f.read() == document.markdown(DATA, COMMAND)


def test_a_side_list_caching_is_not_the_model_caching(monkeypatch):
    """A chain over a refiner list only leaves the main list uncached: the row must say so."""
    stats = [cf.CacheStats(chain="context_refiner[2]", pattern="3", n_blocks=2, cached_steps=[3])]
    monkeypatch.setattr(matrix, "summary", lambda model, logging=False: stats)  # the name matrix reads
    result = matrix._path_result(None, torch.ones(2), torch.ones(2), [], "layers")
    assert result.status == matrix.UNCACHED and "main block list layers does not cache" in result.reason


# --- a model diffusers does not have: a new class, new block classes, new attribute names ------------

W, HEADS = 32, 2


def _attention(q, k, v):
    b, n, _ = q.shape
    split = lambda x: x.view(b, -1, HEADS, W // HEADS).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, W)


class TwinStreamLayer(nn.Module):
    """Joint attention over [prompt, picture] tokens, each stream with its own modulation and MLP."""

    def __init__(self):
        super().__init__()
        self.mod_pic, self.mod_txt = nn.Linear(W, 3 * W), nn.Linear(W, 3 * W)
        self.qkv_pic, self.qkv_txt = nn.Linear(W, 3 * W), nn.Linear(W, 3 * W)
        self.mlp_pic, self.mlp_txt = nn.Linear(W, W), nn.Linear(W, W)

    def forward(self, pic, prompt, cond):
        shift_p, scale_p, gate_p = self.mod_pic(cond)[:, None].chunk(3, -1)
        shift_t, scale_t, gate_t = self.mod_txt(cond)[:, None].chunk(3, -1)
        qp, kp, vp = self.qkv_pic(F.layer_norm(pic, (W,)) * (1 + scale_p) + shift_p).chunk(3, -1)
        qt, kt, vt = self.qkv_txt(F.layer_norm(prompt, (W,)) * (1 + scale_t) + shift_t).chunk(3, -1)
        out = _attention(torch.cat([qt, qp], 1), torch.cat([kt, kp], 1), torch.cat([vt, vp], 1))
        n = prompt.shape[1]
        prompt = prompt + gate_t * out[:, :n]
        pic = pic + gate_p * out[:, n:]
        prompt = prompt + self.mlp_txt(prompt)
        pic = pic + self.mlp_pic(pic)
        return prompt, pic


class FusedLayer(nn.Module):
    """One stream of [prompt, picture] tokens."""

    def __init__(self):
        super().__init__()
        self.mod, self.qkv, self.out = nn.Linear(W, 2 * W), nn.Linear(W, 3 * W), nn.Linear(2 * W, W)

    def forward(self, tokens, cond):
        scale, gate = self.mod(cond)[:, None].chunk(2, -1)
        x = F.layer_norm(tokens, (W,)) * (1 + scale)
        attn = _attention(*self.qkv(x).chunk(3, -1))
        return tokens + gate * self.out(torch.cat([attn, F.silu(x)], -1))


class PromptPolisher(nn.Module):
    """A text-only refiner layer (a side list before the backbone)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.mlp = nn.Linear(W, 3 * W), nn.Linear(W, W)

    def forward(self, prompt):
        prompt = prompt + _attention(*self.qkv(prompt).chunk(3, -1))
        return prompt + self.mlp(prompt)


class AuroraDiT(nn.Module):
    """A 2-d picture DiT: patchify, a prompt refiner, twin-stream then fused layers, unpatchify; the
    prompt mask is checked on the host before the layers (a graph break before the block loop)."""

    def __init__(self, channels=4, patch=2, text=24, compact_prompt=False):
        super().__init__()
        self.patch, self.channels, self.compact_prompt = patch, channels, compact_prompt
        self.stem = nn.Linear(channels * patch * patch, W)
        self.words = nn.Linear(text, W)
        self.clock = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.polishers = nn.ModuleList(PromptPolisher() for _ in range(2))
        self.twin_layers = nn.ModuleList(TwinStreamLayer() for _ in range(3))
        self.fused_layers = nn.ModuleList(FusedLayer() for _ in range(3))
        self.head = nn.Linear(W, channels * patch * patch)

    def forward(self, latents, noise_level, prompt_embeds, prompt_mask):
        b, c, h, w = latents.shape
        p = self.patch
        pic = self.stem(latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p))
        half = torch.exp(-torch.arange(W // 2) / (W // 2) * 9.2)
        angle = noise_level[:, None] * half[None]
        cond = self.clock(torch.cat([angle.sin(), angle.cos()], -1))
        prompt = self.words(prompt_embeds)
        if torch.all(prompt_mask == 0):  # an empty prompt attends to nothing: a host sync before the layers
            prompt = prompt * 0
        if self.compact_prompt:  # the valid prompt tokens, sample by sample: data-dependent shapes in a loop
            kept = []
            for tokens, keep in zip(prompt, prompt_mask):
                kept.append(tokens[keep.bool()])
            prompt = torch.stack(kept)
        for polisher in self.polishers:
            prompt = polisher(prompt)
        for layer in self.twin_layers:
            prompt, pic = layer(pic, prompt, cond)
        tokens = torch.cat([prompt, pic], 1)
        for layer in self.fused_layers:
            tokens = layer(tokens, cond)
        out = self.head(tokens[:, prompt.shape[1]:])
        return (out.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w),)


@pytest.mark.parametrize("compact_prompt", [False, True], ids=["host-sync", "loop-of-data-dependent-shapes"])
def test_a_new_model_under_new_names_caches_its_backbone_with_no_code_change(compact_prompt):
    """Both break the graph before the block loop; the loop of masked selections leaves every block in
    a graph of its own (Dynamo cannot resume inside a loop), and the backbone gets the eager cache."""
    torch.manual_seed(0)
    model = AuroraDiT(compact_prompt=compact_prompt).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(latents=torch.randn(1, 4, 8, 8, generator=g), noise_level=torch.tensor([1000.0]),
                  prompt_embeds=torch.randn(1, 6, 24, generator=g), prompt_mask=torch.ones(1, 6))
    drive = matrix._Drive("latents", "noise_level")
    with torch.no_grad():
        reference, _ = matrix.denoise(model, drive, inputs, num_steps=matrix.STEPS)
    result = matrix._run_path(model, inputs, drive, reference, matrix.main_list(model), matrix._via_enable_cache)
    assert result.status == matrix.CACHES, result.reason
    lists = matrix.chain_lists(result.chain)
    assert lists == ["twin_layers"] if compact_prompt else {"twin_layers", "fused_layers"} <= set(lists)
    assert result.cached_steps and 0 < result.rel_l1 < 0.5
