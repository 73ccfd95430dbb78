"""The eager oracle reference of a real (tiny, random) diffusers transformer, and the comparison of a
compiled run's logs and outputs with it.

Reference runs: the transformer (a deep copy) runs eagerly while its chain's blocks are intercepted.
The Fn blocks run normally; the last Fn block's H gives ``fn_res = H_F - H_in``; the oracle decides;
the middle blocks either run normally or pass their streams through (so the glue between blocks, e.g.
AuraFlow's text+image concat, still runs); at the end of the middle the oracle's outputs (the computed
streams, or passthrough + forecast residual) replace the last middle block's result; Bn runs normally.
Each reference call first runs a short *probe* (Fn + passthrough middle, stopped at the end of the
middle) to get the passthrough values and ask a copy of the oracle whether the middle is needed.
"""
from __future__ import annotations

import copy
import inspect
import math

import torch

from cachedit_fx import zoo
from cachedit_fx.config import DBCacheConfig, TaylorSeerCalibratorConfig

from tests.helpers.oracle import Oracle

STEPS = 20
REL_TOL = 1e-5
# What the blocks return: E first ("EH"), H first ("HE"), or H only ("H"). Inputs are bound by name
# (hidden_states / encoder_hidden_states), so positional calls (Wan) work too.
LAYOUT = {
    "FluxTransformerBlock": "EH", "FluxSingleTransformerBlock": "EH", "JointTransformerBlock": "EH",
    "WanTransformerBlock": "H", "CogVideoXBlock": "HE", "BasicTransformerBlock": "H",
    "HunyuanVideoTransformerBlock": "HE", "HunyuanVideoSingleTransformerBlock": "HE",
    "AuraFlowJointTransformerBlock": "EH", "AuraFlowSingleTransformerBlock": "H",
}


def branches_of(options: dict) -> int:
    separate = options.get("separate_cfg", options["cache_config"].get("enable_separate_cfg"))
    return 2 if separate else 1


# ----------------------------------------------------------------------------- eager reference


class _Stop(Exception):
    pass


class _NeedsMiddle(Exception):
    pass


def _needs_middle():
    raise _NeedsMiddle


def _streams(block, out) -> list[torch.Tensor]:
    """A block's result as [H] or [H, E] (E dropped where the block returns None for it)."""
    layout = LAYOUT[type(block).__name__]
    if layout == "H":
        return [out]
    h, e = (out[1], out[0]) if layout == "EH" else (out[0], out[1])
    return [h] if e is None else [h, e]


def _pack(block, streams):
    layout = LAYOUT[type(block).__name__]
    if layout == "H":
        return streams[0]
    h, e = streams[0], streams[1] if len(streams) > 1 else None
    return (e, h) if layout == "EH" else (h, e)


class Reference:
    """Eager transformer calls with the chain's middle decided by the oracle (see module docstring)."""

    def __init__(self, transformer, block_paths, fn: int, bn: int, timestep_arg: str, make_oracle):
        self.tr = copy.deepcopy(transformer)
        self.blocks = [self.tr.get_submodule(p) for p in block_paths]
        n = len(self.blocks)
        self.last_fn, self.last_mid = fn - 1, n - bn - 1
        assert self.last_fn < self.last_mid, "the test configuration leaves no middle"
        self.timestep_arg, self.make_oracle = timestep_arg, make_oracle
        self.oracle = None
        self.mode = None
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block)

    def _wrap(self, i, block):
        orig = type(block).forward
        sig = inspect.signature(orig)

        def forward(*args, **kwargs):
            bound = sig.bind(block, *args, **kwargs).arguments
            h = bound["hidden_states"]
            e = bound.get("encoder_hidden_states")
            if i == 0:
                self.h_in = h
            in_middle = self.last_fn < i <= self.last_mid
            if in_middle and self.mode in ("probe", "cache"):
                # Blocks skipped: streams pass through unchanged (a block that returns None for E keeps doing so)
                if getattr(block, "context_pre_only", False):
                    e = None
                out = _pack(block, [h] if e is None else [h, e])
            else:
                out = orig(block, *args, **kwargs)
            if i == self.last_fn:
                self.h_fn = _streams(block, out)[0]
            if i == self.last_mid:
                streams = _streams(block, out)
                if self.mode == "probe":
                    self.passthrough = streams
                    raise _Stop
                use_cache, outs = self.oracle.call(self.h_fn - self.h_in, lambda: streams, self.passthrough,
                                                   self.t)
                assert all(use_cache) == (self.mode == "cache") and len(set(use_cache)) == 1
                out = _pack(block, outs)
            return out

        return forward

    def __call__(self, **kwargs):
        self.t = kwargs[self.timestep_arg]
        self.mode = "probe"
        try:
            self.tr(**kwargs)
            raise AssertionError("the chain's middle never finished: wrong block paths?")
        except _Stop:
            pass
        if self.oracle is None:
            self.oracle = self.make_oracle(len(self.passthrough))
        probe = copy.deepcopy(self.oracle)
        try:
            probe.call(self.h_fn - self.h_in, _needs_middle, self.passthrough, self.t)
            self.mode = "cache"
        except _NeedsMiddle:
            self.mode = "compute"
        return self.tr(**kwargs)


def flat(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])


def rel_err(a, b) -> float:
    a, b = flat(a).double(), flat(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def uncond_inputs(name, transformer):
    fam = zoo.get(name)
    return fam.uncond_inputs(transformer, 0) if fam.separate_cfg and fam.uncond_inputs else None


def reference_run(name, transformer, inputs, chain, options, steps=STEPS):
    """Run the eager oracle reference loop; returns (per-call outputs, oracle)."""
    fam = zoo.get(name)
    cache = DBCacheConfig(**options["cache_config"])
    calib = options.get("calibrator_config")
    calib = TaylorSeerCalibratorConfig(**calib) if calib else None
    n_branches = branches_of(options)
    paths = [f"{b.list_path}.{b.index}" for b in chain.info.blocks]
    ref = Reference(transformer, paths, cache.Fn_compute_blocks, cache.Bn_compute_blocks, fam.timestep_arg,
                    lambda n_streams: Oracle(cache, calib, n_branches=n_branches, n_streams=n_streams))
    _, outs = zoo.denoise(transformer, fam, inputs, num_steps=steps, uncond=uncond_inputs(name, transformer), call=ref)
    return outs, ref.oracle


def graph_log(chain, key: str, branch: int, steps: int) -> list:
    """A log of the compiled graph's state: a chain (live state) or a snapshot dict of its logs."""
    tensors = chain if isinstance(chain, dict) else chain.state.tensors
    return tensors[key][branch, :steps, 0].tolist()


def compare_with_oracle(chain, oracle, outs, ref_outs, steps=STEPS, rel_tol=REL_TOL):
    """Assert equal decisions (and gates, diffs) per branch and outputs within rel_tol; returns #cached."""
    n_cached = 0
    for b in range(oracle.n_branches):
        want = [u[0] for u in oracle.branch_log(b, "use_cache")]
        got = graph_log(chain, "cached_log", b, steps)
        want_gate = [g[0] for g in oracle.branch_log(b, "gate")]
        got_gate = graph_log(chain, "gate_log", b, steps)
        want_diff = [d[0] for d in oracle.branch_log(b, "diff")]
        got_diff = graph_log(chain, "diff_log", b, steps)
        detail = (f"branch {b}\n graph  cached {bits(got)} gates {got_gate}\n oracle cached {bits(want)} "
                  f"gates {want_gate}\n graph diffs  {fmt(got_diff)}\n oracle diffs {fmt(want_diff)}")
        assert len(want) == steps, f"oracle saw {len(want)} steps of branch {b}, expected {steps}"
        assert got == want, "cached steps differ\n" + detail
        assert got_gate == want_gate, "gates differ\n" + detail
        for g, w in zip(got_diff, want_diff):
            assert (math.isnan(g) and math.isnan(w)) or abs(g - w) <= 1e-4 * max(1.0, abs(w)), "diffs differ\n" + detail
        n_cached += sum(want)
    errs = [rel_err(o, r) for o, r in zip(outs, ref_outs)]
    assert len(outs) == len(ref_outs) == steps
    worst = max(range(len(errs)), key=errs.__getitem__)
    assert errs[worst] <= rel_tol, (f"output of step {worst} differs by {errs[worst]:.3g} relative "
                                    f"(tolerance {rel_tol}); per step: {fmt(errs)}")
    return n_cached


def bits(xs):
    return "".join("C" if x else "." for x in xs)


def fmt(xs):
    return "[" + ", ".join("nan" if isinstance(x, float) and math.isnan(x) else f"{x:.3g}" for x in xs) + "]"
