"""Tiny hand-written DiTs for the tests that need no diffusers model, and the Euler loop that drives them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

D = 16


def attend(x: torch.Tensor, qkv: nn.Linear) -> torch.Tensor:
    q, k, v = qkv(x).chunk(3, dim=-1)
    return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.mlp = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.proj(attend(hidden_states, self.qkv))
        return hidden_states + self.mlp(hidden_states)


class TinyDiT(nn.Module, CacheMixin):
    """Block lists named and sized by ``lists``, a norm between consecutive lists (so each is a chain)."""

    def __init__(self, lists=(("transformer_blocks", 4),)):
        super().__init__()
        self.lists = [name for name, _ in lists]
        self.proj_in, self.time, self.norm, self.proj_out = nn.Linear(D, D), nn.Linear(1, D), nn.LayerNorm(D), \
            nn.Linear(D, D)
        for name, n in lists:
            setattr(self, name, nn.ModuleList(Block() for _ in range(n)))

    def forward(self, hidden_states, timestep):
        h = self.proj_in(hidden_states) + self.time(timestep[:, None])[:, None]
        for k, name in enumerate(self.lists):
            h = self.norm(h) if k else h
            for block in getattr(self, name):
                h = block(h)
        return self.proj_out(h)


def tiny(*lists) -> TinyDiT:
    torch.manual_seed(0)
    return TinyDiT(lists or (("transformer_blocks", 4),)).eval()


def latent(tokens: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, tokens, D, generator=torch.Generator().manual_seed(seed))


def euler(model, x0: torch.Tensor, steps: int, *context, requests: int = 1) -> list[torch.Tensor]:
    """``requests`` denoising loops of ``steps`` calls ``model(x, *context, t)`` with t falling from 1;
    the model output of every call."""
    outs = []
    with torch.no_grad():
        for _ in range(requests):
            x = x0
            for i in range(steps):
                out = model(x, *context, torch.tensor([1.0 - i / steps]))
                outs.append(out)
                x = x - 0.1 * out
    return outs


def uniform(steps: int, start: float = 1.0) -> list[float]:
    """``steps`` timesteps falling evenly from ``start``."""
    return [start * (1 - i / steps) for i in range(steps)]


def request(model, timesteps, x: torch.Tensor, *context) -> list[torch.Tensor]:
    """One denoising loop of ``model(x, *context, t)`` over the given timesteps; every call's output."""
    outs = []
    with torch.no_grad():
        for t in timesteps:
            out = model(x, *context, torch.tensor([t]))
            outs.append(out)
            x = x - 0.1 * out
    return outs


class CrossBlock(nn.Module):
    """Self-attention on H, cross-attention to a read-only context (pattern 2)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.kv, self.mlp = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 2 * D), \
            nn.Linear(D, D)

    def forward(self, x, ctx):
        x = x + self.proj(attend(x, self.qkv))
        k, v = self.kv(ctx).chunk(2, dim=-1)
        x = x + F.scaled_dot_product_attention(x, k, v)
        return x + self.mlp(x)


class CrossDiT(nn.Module):
    """A DiT written by hand, not diffusers: ``forward(x, ctx, noise_level)`` returns a plain tensor. Its
    timestep has no timestep-like name; it feeds a sinusoidal embedding, as a real DiT's does."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.proj_in, self.time, self.proj_out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.layers = nn.ModuleList(CrossBlock() for _ in range(depth))

    def forward(self, x, ctx, noise_level):
        h = self.proj_in(x) + self.time(get_timestep_embedding(noise_level * 1000, D))[:, None]
        for layer in self.layers:
            h = layer(h, ctx)
        return self.proj_out(h)


def cross_dit() -> CrossDiT:
    """The factory ``cachedit-fx export --config tinydit:cross_dit`` builds (seeded, eval mode)."""
    torch.manual_seed(0)
    return CrossDiT().eval()


class JointBlock(nn.Module):
    """Attention over H, a text stream E updated beside it and mixed into H; returns (E, H) as Flux's
    double blocks do (pattern 1). ``host_sync``: a host read in the block's own forward (``.item()``
    deciding a Python branch), which no graph can hold."""

    def __init__(self, host_sync: bool = False):
        super().__init__()
        self.qkv, self.proj, self.mlp, self.e_proj = nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, D), \
            nn.Linear(D, D)
        self.host_sync = host_sync

    def forward(self, hidden_states, encoder_hidden_states):
        if self.host_sync and hidden_states.abs().max().item() > 1e6:
            hidden_states = hidden_states / 2
        hidden_states = hidden_states + self.proj(attend(hidden_states, self.qkv))
        encoder_hidden_states = encoder_hidden_states + self.e_proj(encoder_hidden_states).tanh()
        hidden_states = hidden_states + self.mlp(hidden_states) + encoder_hidden_states.mean(dim=1, keepdim=True)
        return encoder_hidden_states, hidden_states


class JointDiT(nn.Module, CacheMixin):
    """One list of ``depth`` joint blocks: ``forward(hidden_states, encoder_hidden_states, timestep)``."""

    def __init__(self, depth: int = 5, host_sync: bool = False):
        super().__init__()
        self.proj_in, self.text_in, self.time, self.proj_out = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(1, D), \
            nn.Linear(D, D)
        self.transformer_blocks = nn.ModuleList(JointBlock(host_sync) for _ in range(depth))

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        h = self.proj_in(hidden_states) + self.time(timestep[:, None])[:, None]
        e = self.text_in(encoder_hidden_states)
        for block in self.transformer_blocks:
            e, h = block(h, e)
        return self.proj_out(h)


def joint_dit(depth: int = 5) -> JointDiT:
    torch.manual_seed(0)
    return JointDiT(depth).eval()
