"""No host sync: the decision and the whole glue (pre_step, both branches' steps, post_step) trace as one
Dynamo graph without breaks."""
from __future__ import annotations

import math

from cachedit_fx.config import TaylorSeerCalibratorConfig
from cachedit_fx.runtime.algorithm import decide
from cachedit_fx.runtime.layout import params_from_config
from cachedit_fx.runtime.step import cached_step, computed_step, post_step, pre_step

from tests.runtime.glue import E_SHAPE, H_SHAPE, LATENT_SHAPE, Glue, cfg


def test_decide_compiles_without_graph_breaks():
    import torch._dynamo

    c = cfg(max_warmup_steps=2, max_cached_steps=5, steps_computation_mask=[1, 0, 1])
    params, mask = params_from_config(c)
    params, mask = torch.tensor(params, dtype=torch.float64), torch.tensor(mask, dtype=torch.int8)

    def f(step, diff, has_ref, cached, run, acc, params, mask):
        return decide(step, diff, has_ref, cached, run, acc, params, mask)

    args = lambda s, d: (torch.tensor(s), torch.tensor([d], dtype=torch.float32), torch.tensor([True]),
                         torch.tensor([1]), torch.tensor([0]), torch.tensor([0.0]), params, mask)
    explained = torch._dynamo.explain(f)(*args(3, 0.01))  # explain resets Dynamo itself
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for s, d in ((0, 0.01), (1, 0.01), (3, 0.01), (3, 0.5), (4, math.nan)):
        got, want = compiled(*args(s, d)), f(*args(s, d))
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g, w_, equal_nan=True)


def test_glue_compiles_without_graph_breaks():
    """pre_step, both branches' steps and post_step (two branches, shared diff, per-sample slots) trace as one
    graph."""
    import torch._dynamo

    c = cfg(per_sample=True, enable_separate_cfg=True, cfg_diff_compute_separate=False, max_cached_steps=3)
    glue = Glue(c, TaylorSeerCalibratorConfig(taylorseer_order=2), n_branches=2, batch=2)
    layout = glue.layout

    def f(fn_res, t, x, out_h, out_e, base_h, base_e, *state):
        pre = pre_step(layout, fn_res, t, x, *state)
        st = dict(zip(layout.names(), state))
        ladders = [st["ladder_0"], st["ladder_1"]]
        cached = cached_step(layout, [base_h, base_e], pre.branch, pre.ladder_len, pre.distance, st["ref"], ladders)
        out = computed_step(layout, pre.use_cache, pre.step, pre.branch, pre.ladder_len, pre.distance, fn_res,
                            [out_h, out_e], [base_h, base_e], st["ref"], ladders)
        post_step(layout, pre, out.finite, out.rows, *state)
        return pre.pred, out.outs, cached.outs

    args = [torch.randn(2, *H_SHAPE), torch.tensor([5.0]), torch.randn(2, *LATENT_SHAPE), torch.randn(2, *H_SHAPE),
            torch.randn(2, *E_SHAPE),
            torch.randn(2, *H_SHAPE), torch.randn(2, *E_SHAPE)]
    explained = torch._dynamo.explain(f)(*args, *glue.state.ordered())  # explain resets Dynamo itself
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
