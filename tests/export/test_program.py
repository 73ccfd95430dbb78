"""The exported program (torch.export, no package built): it holds the cond and no host sync; export's
argument checks (dynamic shapes, models that need islands, DBPrune); load's missing-file error."""
import pytest
import torch

from cachedit_fx import DBPruneConfig, zoo
from cachedit_fx.export import export_program, load

from tests.export.common import CACHE, dynamic_spec, flux_inputs, pipeline_call_kwargs


@pytest.mark.slow
def test_exported_program_holds_cond_and_no_host_sync(flux_pipe):
    kwargs = pipeline_call_kwargs(flux_pipe)
    ep, _ = export_program(flux_pipe.transformer, example_kwargs=kwargs, cache_config=CACHE)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("cond" in t for t in targets)
    assert not [t for t in targets if "_local_scalar_dense" in t or t.endswith(".item") or "is_nonzero" in t]


def test_export_refuses_dbprune():
    transformer, kwargs = zoo.build_transformer("flux")
    with pytest.raises(ValueError, match="export: cache_config is a DBPruneConfig; export packages DBCache"):
        export_program(transformer, example_kwargs=kwargs, cache_config=DBPruneConfig(Fn_compute_blocks=1))


def test_load_missing_file():
    with pytest.raises(FileNotFoundError, match="no such package"):
        load("/nonexistent/model.pt2")


@pytest.mark.slow
def test_dynamic_shapes_validation(flux_pipe):
    kwargs = flux_inputs(flux_pipe.transformer, 1, 8)
    with pytest.raises(ValueError, match="dynamic_shapes: 'latents' is not a tensor argument.*hidden_states"):
        export_program(flux_pipe.transformer, example_kwargs=kwargs, dynamic_shapes={"latents": {0: None}})
    with pytest.raises(ValueError, match=r"dynamic_shapes\['hidden_states'\]: dimension 0 has size 1"):
        export_program(flux_pipe.transformer, example_kwargs=kwargs, dynamic_shapes=dynamic_spec())
    with pytest.raises(ValueError, match=r"dimension 5 is out of range"):
        export_program(flux_pipe.transformer, example_kwargs=kwargs, dynamic_shapes={"hidden_states": {5: torch.export.Dim.AUTO}})


@pytest.mark.slow
def test_dynamic_dims_the_model_constrains_raise_clear_error():
    from torch.export import Dim

    transformer, kwargs = zoo.build_transformer("sd3")  # latents (B, C, H, W), patch 2, bounded pos-embed table
    spec = {"hidden_states": {2: Dim("height", min=4, max=128)}}
    with pytest.raises(ValueError, match=r"dynamic_shapes: SD3Transformer2DModel does not allow .*hidden_states\.size\(2\)"):
        export_program(transformer, example_kwargs=kwargs, cache_config=CACHE, dynamic_shapes=spec)


@pytest.mark.slow
def test_export_refuses_models_that_need_islands():
    transformer, kwargs = zoo.build_transformer("mochi")  # torch.nonzero in every block's attention
    with pytest.raises(ValueError, match=r"export: MochiTransformer3DModel's blocks hold data-dependent ops "
                                         r"\(in \['MochiAttention'\]\).*cannot hold"):
        export_program(transformer, example_kwargs=kwargs, cache_config=CACHE)


@pytest.mark.slow
def test_dynamic_dim_without_bounds_records_an_open_range(flux_pipe):
    from torch.export import Dim

    tokens = Dim("tokens")  # no min / max
    _, meta = export_program(flux_pipe.transformer, example_kwargs=flux_inputs(flux_pipe.transformer, 1, 8),
                             cache_config=CACHE, dynamic_shapes={"hidden_states": {1: tokens}, "img_ids": {0: tokens}})
    (symbol, (lo, hi)), = meta["bounds"].items()
    assert lo >= 2 and hi is None
    # structured, not a string; two state sets: enable_separate_cfg=None detects CFG pairs on every path
    assert meta["chains"][0]["state_shapes"]["ref"] == [2, 1, {"sym": symbol}, 32]


def test_wan_exports_with_dynamic_height_and_width_and_sizes_its_state_for_any_of_them():
    """Wan's tokens are ``frames * (h // 2) * (w // 2)``: the cond's branch outputs are strided by plain size
    products (passes/rewrite.fresh_dense), and the state's templates multiply the three factors."""
    from torch.export import Dim

    from cachedit_fx.runtime.shapes import evaluate

    transformer, kwargs = zoo.build_transformer("wan")
    kwargs["hidden_states"] = torch.randn(1, 16, 2, 8, 8)
    ep, meta = export_program(transformer, example_kwargs=kwargs, cache_config=CACHE,
                              dynamic_shapes={"hidden_states": {3: Dim.AUTO, 4: Dim.AUTO}})
    assert any(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes)
    ref = meta["chains"][0]["state_shapes"]["ref"]
    user = [torch.empty(1, 16, 2, 10, 6) if shape is not None and len(shape) == 5 else None
            for shape in meta["user_shapes"]]
    tokens = 2 * (10 // 2) * (6 // 2)
    assert evaluate(ref, meta["symbols"], user)[-2] == tokens, ref
