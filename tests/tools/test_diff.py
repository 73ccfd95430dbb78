"""``cachedit-fx diff``: the graph before and after the pass as text, JSON, dot, PNG and SVG, for zoo
models, a diffusers class with a config JSON and a local model folder; errors on one line."""
from __future__ import annotations

import json

import pytest
import torch

from cachedit_fx import zoo

from tests.helpers.cli import assert_one_line_error, assert_png, needs_graphviz, run
from tests.helpers.tinydit import latent, tiny


def test_diff_json_flux_fn_bn_cut_lists_and_inserted_nodes(capsys, tmp_path):
    out_file = tmp_path / "flux.json"
    rc, out, _ = run(capsys, "diff", "flux", "--fn", "2", "--bn", "2", "--out", str(out_file))
    assert rc == 0 and out == ""  # --format inferred from the extension
    report = json.loads(out_file.read_text())
    assert report["matched"] and report["fn"] == 2 and report["bn"] == 2
    chain = report["chains"][0]
    assert chain["name"] == "transformer_blocks[4]+single_transformer_blocks[4]"
    assert chain["pattern"] == "1→1" and chain["n_blocks"] == 8
    assert [(l["list"], l["blocks"]) for l in chain["lists"]] == [
        ("transformer_blocks", [0, 3]), ("single_transformer_blocks", [4, 7])]
    assert chain["cut"] == {"Fn": [0, 1], "middle": [2, 5], "Bn": [6, 7]}
    assert {c["role"] for c in chain["carries_out_of_middle"]} == {"H", "E"}
    assert chain["fn_residual"]["H_in"]["shape"] == chain["fn_residual"]["H_after_Fn"]["shape"]
    targets = [i["target"] for i in chain["inserted"]]
    assert "cond" in targets and targets.index("cachedit_pre_step_0") < targets.index("cond") \
        < targets.index("cachedit_post_step_0")
    assert {"ref", "diff_log", "gate_log", "cached_log"} <= set(chain["state"])
    assert report["after"]["nodes"] < report["before"]["nodes"]  # the middle moved into the cond branches
    assert report["moved_into_branches"] == []  # Bn = 2 reads the text stream: Fn's tail feeds the forecast


@pytest.mark.slow
def test_diff_text_lists_the_nodes_moved_into_the_full_branch(capsys):
    rc, out, _ = run(capsys, "diff", "flux", "--fn", "1", "--bn", "0", "--format", "text")
    assert rc == 0
    line = next(l for l in out.splitlines() if l.startswith("moved into the one cond branch"))
    assert "context_attn_output" in line  # block 0's text-stream tail, read only by the skipped blocks


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.FAMILY_NAMES)
def test_diff_text_runs_for_every_family(capsys, name):
    rc, out, err = run(capsys, "diff", name, "--format", "text")
    assert rc == 0, err
    assert out.startswith(("before:", "graph break:", "islands"))
    assert "unmatched:" not in out  # every zoo family caches (some through islands, as enable_cache does)
    assert "\nchain " in out and "cut: Fn [0, 0] | middle" in out and "inserted:" in out
    if name in ("hidream", "mochi"):  # a MoE routing loop / torch.nonzero inside every block
        assert out.startswith("islands") and {"hidream": "MOEFeedForwardSwiGLU x8", "mochi": "MochiAttention x"}[name] in out


@pytest.mark.slow
@needs_graphviz
def test_diff_png_and_dot(capsys, tmp_path):
    png = tmp_path / "sd3.png"
    rc, out, _ = run(capsys, "diff", "sd3", "--fn", "1", "--bn", "1", "--format", "png", "--out", str(png))
    assert rc == 0 and f"wrote {png}" in out
    assert_png(png)

    rc, dot, _ = run(capsys, "diff", "sd3", "--fn", "1", "--bn", "1", "--format", "dot")
    assert rc == 0
    assert dot.startswith("digraph cachedit {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    for needle in ("cluster_c0_fn", "cluster_c0_mid", "cluster_c0_bn", "torch.cond", "True: reuse",
                   "False: compute", "c0_b3 -> c0_out"):
        assert needle in dot, needle


@needs_graphviz
def test_unmatched_report_draws_and_emits_dot(tmp_path):
    from cachedit_fx.tools.render import render_dot, render_image
    from cachedit_fx.tools.report import GraphReport, GraphSize

    report = GraphReport(matched=False, fn=1, bn=0, before=GraphSize(3), reason="no repeated transformer blocks found")
    path = render_image(report, str(tmp_path / "u.png"), title="toy")
    assert_png(path)
    dot = render_dot(report, title="toy")
    assert dot.startswith("digraph") and "no repeated transformer blocks found" in dot


@needs_graphviz
def test_long_chain_png_and_svg(tmp_path):
    """Real DiTs have 20-60 blocks: the picture keeps both ends of each segment and an ellipsis."""
    from cachedit_fx.tools.render import render_dot, render_image
    from cachedit_fx.tools.report import BlockList, ChainReport, Cut, GraphReport, GraphSize

    chain = ChainReport(name="transformer_blocks[19]+single_transformer_blocks[38]", pattern="1→1", n_blocks=57,
                        lists=[BlockList("transformer_blocks", [0, 18], 1), BlockList("single_transformer_blocks", [19, 56], 1)],
                        cut=Cut([0, 7], [8, 52], [53, 56]), fn_residual={}, carries_into_middle=[],
                        carries_out_of_middle=[], inserted=[], state={})
    report = GraphReport(matched=True, fn=8, bn=4, before=GraphSize(10), after=GraphSize(5), chains=[chain])
    dot = render_dot(report)
    assert "c0_b0 " in dot and "c0_b52 " in dot and "c0_mid_more" in dot and "c0_b20 " not in dot
    assert_png(render_image(report, str(tmp_path / "long.png")))
    svg = render_image(report, str(tmp_path / "long.svg"), "svg")
    text = open(svg).read()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")


def test_diff_picture_without_graphviz_says_how_to_install(capsys, tmp_path, monkeypatch):
    import cachedit_fx.tools.render

    monkeypatch.setattr(cachedit_fx.tools.render.shutil, "which", lambda name: None)
    rc, _, err = run(capsys, "diff", "sd3", "--format", "png", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(rc, err, "Graphviz", "apt install graphviz", "--format dot", code=3)
    assert not (tmp_path / "x.png").exists()


def _sd3_config(tmp_path, **changes):
    transformer, _ = zoo.build_transformer("sd3")
    cfg = {**dict(transformer.config), **changes}
    path = tmp_path / "sd3.json"
    path.write_text(json.dumps(cfg))
    return transformer, path


def test_diff_class_with_config_json(capsys, tmp_path):
    _, cfg = _sd3_config(tmp_path, num_layers=3)
    rc, out, err = run(capsys, "diff", "diffusers:SD3Transformer2DModel", "--config", str(cfg), "--format", "json")
    assert rc == 0, err
    chain = json.loads(out)["chains"][0]
    assert chain["n_blocks"] == 3 and chain["cut"] == {"Fn": [0, 0], "middle": [1, 2], "Bn": None}


@pytest.mark.slow
def test_diff_local_diffusers_folder(capsys, tmp_path):
    transformer, _ = zoo.build_transformer("sd3")
    folder = tmp_path / "sd3_model"
    transformer.save_pretrained(folder)
    rc, out, err = run(capsys, "diff", str(folder), "--format", "json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["matched"] and report["chains"][0]["n_blocks"] == 4


def test_diff_config_errors_are_one_line(capsys, tmp_path):
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [8],
                                "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
                                "norm_num_groups": 4}))
    rc, _, err = run(capsys, "diff", "diffusers:UNet2DModel", "--config", str(unet))
    assert_one_line_error(rc, err, "no example inputs", "UNet2DModel")
    rc, _, err = run(capsys, "diff", "diffusers:SD3Transformer2DModel")
    assert_one_line_error(rc, err, "--config")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = run(capsys, "diff", "diffusers:SD3Transformer2DModel", "--config", str(bad))
    assert_one_line_error(rc, err, "not valid JSON")
    rc, _, err = run(capsys, "diff", "diffusers:NoSuchModel", "--config", str(bad))
    assert_one_line_error(rc, err, "NoSuchModel")
    rc, _, err = run(capsys, "diff", "no_such_pkg.mod:Cls", "--config", str(bad))
    assert_one_line_error(rc, err, "cannot import")
    rc, _, err = run(capsys, "diff", str(tmp_path))  # a folder without config.json
    assert_one_line_error(rc, err, "config.json")


def test_diff_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "diff", "no-such-model")
    assert_one_line_error(rc, err, "unknown zoo model")
    rc, _, err = run(capsys, "diff", str(tmp_path / "missing" / "model"))
    assert_one_line_error(rc, err, "no such model folder")
    rc, _, err = run(capsys, "diff", "sd3", "--fn", "3", "--bn", "2")  # 4 blocks
    assert_one_line_error(rc, err, "do not fit", "Fn_compute_blocks=3")
    rc, _, err = run(capsys, "diff", "sd3", "--fn", "0")
    assert_one_line_error(rc, err, "Fn_compute_blocks")
    rc, _, err = run(capsys, "diff", "sd3", "--format", "png", "--out", str(tmp_path / "nodir" / "x.png"))
    assert_one_line_error(rc, err, "output folder does not exist")


def test_the_diff_report_counts_the_flattened_weights():
    from cachedit_fx.tools.render import render_text
    from cachedit_fx.tools.report import describe

    ao = pytest.importorskip("torchao.quantization", reason="torchao 0.18.0 (pip install 'cachedit-fx[quant]')")
    model = tiny()
    ao.quantize_(model.transformer_blocks, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    report = describe(model, dict(hidden_states=latent(), timestep=torch.tensor([1.0])))
    assert report.matched and report.flattened_subclasses and set(report.flattened_subclasses) == {"Int8Tensor"}
    assert f"plain tensors: {report.flattened_subclasses['Int8Tensor']} Int8Tensor" in render_text(report)
    assert describe(tiny(), dict(hidden_states=latent(), timestep=torch.tensor([1.0]))).flattened_subclasses is None
