"""Each zoo family under test, compiled once for all its cache configurations, and its runs against the
oracle reference (tests/backend/reference.py), shared by the tests that read them.

Compile time dominates these tests, so each family is traced by Dynamo once: a small switching backend
hands the one Dynamo graph to ``cachedit_backend`` once per cache configuration and routes calls to
the configuration under test (``Switch``); its aot_eager configuration also keeps the graphs handed
to the inner compiler for the host-read checks. Dynamo's own ``backend="cachedit"`` path (entry
point, options) is exercised by the Inductor, compile-count, option and fallback tests.
"""
from __future__ import annotations

import functools
import os
import re
import time
import warnings

from cachedit_fx import zoo
from cachedit_fx.backend import cachedit_backend

from tests.backend.reference import STEPS, reference_run, uncond_inputs
from tests.helpers.dynamo import compile_own

# Thresholds that give a MIX of cached and recomputed steps after warmup on each family's random
# weights (so the diff test decides both ways and TaylorSeer order 2 gets its second derivative):
# measured Fn-residual diffs at 20 steps are ~0.25-0.6 (Flux, SD3, CogVideoX, HunyuanVideo), ~0.05-0.15
# (Wan, PixArt) and ~1 (AuraFlow, whose residual barely correlates between steps: few steps cache).
THRESHOLD = {"flux": 0.4, "sd3": 0.35, "wan": 0.1, "cogvideox": 0.3, "pixart": 0.1, "hunyuanvideo": 0.4,
             "auraflow": 0.95}
FAMILIES = ("flux", "sd3", "wan", "cogvideox", "pixart", "hunyuanvideo", "auraflow")
F1B1_FAMILIES = ("flux", "cogvideox")
# AOTAutograd's trace is most of each compile here (5-10 s per configuration on a busy 2-core box), so
# by default each family compiles ONE configuration with aot_eager (rotating DBCache / TaylorSeer 1 /
# TaylorSeer 2 over the families) and the others with the eager inner compiler: the pass and the graph
# are the same, only the inner compiler differs. CACHEDIT_TEST_ALL_AOT=1 compiles every case with aot_eager.
ALL_AOT = os.environ.get("CACHEDIT_TEST_ALL_AOT", "") not in ("", "0")
MAIN = ("dbcache", "taylorseer1", "taylorseer2")


def aot_config(name: str) -> str:
    return MAIN[FAMILIES.index(name) % len(MAIN)]


def family_configs(name: str) -> dict[str, dict]:
    base = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=THRESHOLD[name],
                max_warmup_steps=2)
    out = {
        "dbcache": dict(cache_config=base),
        "taylorseer1": dict(cache_config=base, calibrator_config=dict(taylorseer_order=1)),
        "taylorseer2": dict(cache_config=base, calibrator_config=dict(taylorseer_order=2)),
    }
    if name in F1B1_FAMILIES:
        out["f1b1"] = dict(cache_config={**base, "Bn_compute_blocks": 1})
        out["f1b1_taylorseer2"] = dict(cache_config={**base, "Bn_compute_blocks": 1},
                                       calibrator_config=dict(taylorseer_order=2))
    fam = zoo.get(name)
    for key, o in out.items():
        o["inner"] = "aot_eager" if ALL_AOT or key == aot_config(name) else "eager"
        if fam.separate_cfg:  # both spellings: the backend option, and the cache-dit config field
            if key == "dbcache":
                o["separate_cfg"] = True
            else:
                o["cache_config"] = {**o["cache_config"], "enable_separate_cfg": True}
    return out


CASES = [(name, key) for name in FAMILIES for key in family_configs(name)]


class Switch:
    """A Dynamo backend that compiles the one captured graph with ``cachedit_backend`` once per
    configuration; calls go to the configuration named by ``current``. An ``inner="aot_eager"``
    configuration runs through a spy with the same AOTAutograd settings that keeps the Dynamo-level
    graph the backend hands on and the aten-level forward graph."""

    def __init__(self, configs: dict[str, dict]):
        self.configs, self.runs, self.current, self.calls = configs, {}, None, 0
        self.graphs: dict[str, dict[str, list]] = {}

    def _spy(self, key):
        from torch._dynamo.backends.debugging import aot_eager, boxed_nop

        graphs = self.graphs.setdefault(key, {"dynamo": [], "aten": []})

        def fw(gm, example_inputs):
            graphs["aten"].append(gm)
            return boxed_nop(gm, example_inputs)

        def inner(gm, example_inputs):
            graphs["dynamo"].append(gm)
            return aot_eager(gm, example_inputs, fw_compiler=fw)

        return inner

    def __call__(self, gm, example_inputs):
        self.calls += 1
        self.gm, self.example_inputs = gm, list(example_inputs)
        for key, opts in self.configs.items():
            opts = dict(opts)
            if opts.get("inner") == "aot_eager":
                opts["inner"] = self._spy(key)
            try:
                self.runs[key] = cachedit_backend(gm, example_inputs, options=opts)
            except Exception as e:  # reported per configuration by the test that uses it
                self.runs[key] = e

        def dispatch(*args):
            run = self.runs[self.current]
            if isinstance(run, Exception):
                raise run
            return run(*args)

        return dispatch

    def flat_args(self, kwargs: dict) -> list:
        """The graph's flat inputs for a call with ``kwargs`` (to call a compiled graph directly)."""
        args = list(self.example_inputs)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for i, node in enumerate(placeholders):
            m = re.fullmatch(r"l_(?:kwargs_)?(.+)_", node.name)
            if m and m.group(1) in kwargs:
                args[i] = kwargs[m.group(1)]
        return args


LOGS = ("cached_log", "gate_log", "diff_log")


@functools.lru_cache(maxsize=None)
def family_results(name: str) -> dict:
    """Compile ``name`` once for all its configurations; run each against the oracle reference."""
    transformer, inputs = zoo.build_transformer(name)
    fam = zoo.get(name)
    configs = family_configs(name)
    switch = Switch(configs)
    compiled = compile_own(transformer, backend=switch, fullgraph=True, dynamic=False)
    results = {"switch": switch, "transformer": transformer, "inputs": inputs}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key, opts in configs.items():
            switch.current = key
            t0 = time.time()
            try:
                _, outs = zoo.denoise(transformer, fam, inputs, num_steps=STEPS, uncond=uncond_inputs(name, transformer),
                                      call=compiled)
            except Exception as e:
                results[key] = dict(error=e)
                continue
            handle = switch.runs[key].cachedit_handle
            # snapshot the logs: later tests may run the same compiled graph again
            logs = [{k: c.state.tensors[k].clone() for k in LOGS} for c in handle.chains]
            results[key] = dict(handle=handle, logs=logs, outs=outs, seconds=time.time() - t0)
            if handle.chains:
                ref_outs, oracle = reference_run(name, transformer, inputs, handle.chains[0], opts)
                results[key].update(ref_outs=ref_outs, oracle=oracle)
    for key in configs:
        results[key]["warnings"] = [str(w.message) for w in caught if "cachedit" in str(w.message)]
        results[key]["backend_calls"] = switch.calls
    return results
