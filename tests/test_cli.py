"""The ``cachedit-fx`` command line, in process: diff (text / json / dot / png / svg, --config, model
folders), trace (the per-step decision table) and metrics (PSNR / SSIM / MSE against independent
computations; LPIPS / CLIP score only with local weights), and one-line errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cachedit_fx.tools.cli import main
from cachedit_fx import zoo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None, reason="png/svg are laid out by Graphviz's dot")


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles, code=2):
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("cachedit-fx ")
    for n in needles:
        assert n in lines[0], lines[0]


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100


# ----------------------------------------------------------------------------- demo


def test_demo_caches_the_trained_digits_model_and_writes_one_png(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the demo's classifier needs scikit-learn")
    out = tmp_path / "demo.png"
    # 8 steps move the latent more per step than 28: the diffs are ~0.3-0.6, so a threshold above the usual
    rc, stdout, _ = run(capsys, "demo", "--inner", "eager", "--steps", "8", "--size", "32", "--warmup", "2",
                        "--rows", "1", "--threshold", "0.45", "--out", str(out))
    assert rc == 0, stdout
    cached, steps = map(int, stdout.split("cached steps ")[1].split()[0].split("/"))
    assert steps == 8 and 0 < cached < 8
    uncond = int(stdout.split("(uncond ")[1].split("/")[0])
    assert 0 < uncond < 8  # separate CFG: the uncond calls cache on their own state
    psnr = float(stdout.split("PSNR ")[1].split()[0])
    assert 20 < psnr < float("inf") and "SSIM" in stdout and "speedup" in stdout
    accuracy = [float(x.rstrip("%")) for x in stdout.split("classifier accuracy: ")[1].split()[1:4:2]]
    assert len(accuracy) == 2 and min(accuracy) >= 80
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1200, 500)


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["demo"], ["tune"], ["diff"], ["trace"], ["metrics"]])
def test_help_for_every_command(capsys, command):
    rc, out, _ = run(capsys, *command, "--help")
    assert rc == 0
    assert out.startswith("usage: cachedit-fx")


def test_metrics_help_says_how_videos_are_read(capsys):
    _, out, _ = run(capsys, "metrics", "--help")
    text = " ".join(out.split())
    assert "GIF" in text and "mp4" in text and "folders of frames" in text
    assert "installed here" in text


def test_usage_error_is_one_line(capsys):
    rc, _, err = run(capsys, "metrics", "nosuchmetric", "a.png", "b.png")
    assert_one_line_error(rc, err, "invalid choice")
    rc, _, err = run(capsys, "diff")
    assert_one_line_error(rc, err, "model")


# ----------------------------------------------------------------------------- diff


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


def test_diff_text_lists_the_nodes_moved_into_the_full_branch(capsys):
    rc, out, _ = run(capsys, "diff", "flux", "--fn", "1", "--bn", "0", "--format", "text")
    assert rc == 0
    line = next(l for l in out.splitlines() if l.startswith("moved into the one cond branch"))
    assert "context_attn_output" in line  # block 0's text-stream tail, read only by the skipped blocks


@pytest.mark.parametrize("name", zoo.FAMILY_NAMES)
def test_diff_text_runs_for_every_family(capsys, name):
    rc, out, err = run(capsys, "diff", name, "--format", "text")
    assert rc == 0, err
    assert out.startswith(("before:", "graph break:", "islands"))
    assert "unmatched:" not in out  # every zoo family caches (some through islands, as enable_cache does)
    assert "\nchain " in out and "cut: Fn [0, 0] | middle" in out and "inserted:" in out
    if name in ("hidream", "mochi"):  # a MoE routing loop / torch.nonzero inside every block
        assert out.startswith("islands") and {"hidream": "MOEFeedForwardSwiGLU x8", "mochi": "MochiAttention x"}[name] in out


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
    import cachedit_fx.render

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


# ----------------------------------------------------------------------------- trace


def test_trace_prints_decision_table_with_cached_step(capsys, tmp_path):
    plot = tmp_path / "trace.png"
    rc, out, err = run(capsys, "trace", "dit", "--steps", "5", "--threshold", "0.5", "--warmup", "2",
                       "--plot", str(plot))
    assert rc == 0, err
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:2] == ["step", "branch"])
    assert lines[header].split() == ["step", "branch", "timestep", "diff", "threshold", "gate", "cached"]
    rows = [l.split() for l in lines[header + 2: header + 7]]
    assert [int(r[0]) for r in rows] == list(range(5))
    assert [r[5] for r in rows[:2]] == ["warmup", "warmup"] and [r[6] for r in rows[:2]] == ["no", "no"]
    assert all(r[4] == "0.5" for r in rows)
    cached = [r for r in rows if r[6] == "yes"]
    assert cached, out
    for r in cached:  # a step cached by the diff test had a diff below the threshold
        assert r[5] == "diff_test" and float(r[3]) < 0.5
    n_cached = len(cached)
    assert f"cached {n_cached}/5 steps" in out
    assert_png(plot)


def test_trace_separate_cfg_json(capsys):
    rc, out, err = run(capsys, "trace", "wan", "--steps", "4", "--threshold", "0.5", "--format", "json",
                       "--plot", "")
    assert rc == 0, err
    report = json.loads(out)
    assert report["plot"] is None
    branches = {c["branch"]: c for c in report["chains"]}
    assert set(branches) == {"cond", "uncond"}
    for c in branches.values():
        assert c["steps"] == 4 and [r["step"] for r in c["rows"]] == [0, 1, 2, 3]
        assert c["rows"][0]["gate"] == "warmup" and c["rows"][0]["diff"] is None
        assert [r["timestep"] for r in c["rows"]] == [1000.0, 750.0, 500.0, 250.0]
        assert c["cached_steps"] == sum(r["cached"] for r in c["rows"])


def test_trace_errors_are_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "trace", "sd3", "--fn", "3", "--bn", "2", "--steps", "2", "--plot", "")
    assert_one_line_error(rc, err, "do not fit")
    rc, _, err = run(capsys, "trace", "no-such-model")
    assert_one_line_error(rc, err, "unknown zoo model")
    rc, _, err = run(capsys, "trace", "sd3", "--steps", "0")
    assert_one_line_error(rc, err, "--steps")


# ----------------------------------------------------------------------------- metrics


def _save(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def _numpy_psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    b[:10] = 255 - b[:10]
    return a, b, _save(tmp_path / "a.png", a), _save(tmp_path / "b.png", b)


def _json_metric(capsys, *argv):
    rc, out, err = run(capsys, "metrics", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_psnr_identical_prints_inf(capsys, images):
    _, _, pa, _ = images
    rc, out, _ = run(capsys, "metrics", "psnr", pa, pa)
    assert rc == 0 and out.strip() == "psnr: inf dB"


def test_psnr_and_mse_match_numpy(capsys, images):
    a, b, pa, pb = images
    got = _json_metric(capsys, "psnr", pa, pb)["mean"]
    assert got == pytest.approx(_numpy_psnr(a, b), abs=1e-9)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert _json_metric(capsys, "mse", pa, pb)["mean"] == pytest.approx(mse, rel=1e-12)
    _, out, _ = run(capsys, "metrics", "psnr", pa, pb)
    assert out.strip() == f"psnr: {_numpy_psnr(a, b):.4f} dB"


def test_uint8_large_differences_do_not_wrap(capsys, tmp_path):
    black = _save(tmp_path / "black.png", np.zeros((16, 16, 3)))
    white = _save(tmp_path / "white.png", np.full((16, 16, 3), 255))
    assert _json_metric(capsys, "psnr", black, white)["mean"] == pytest.approx(0.0, abs=1e-12)  # wrapped: 48 dB
    assert _json_metric(capsys, "mse", white, black)["mean"] == pytest.approx(255.0 ** 2)
    hi = np.full((16, 16, 3), 200)
    lo = np.full((16, 16, 3), 50)
    lo[:8] = 0
    got = _json_metric(capsys, "psnr", _save(tmp_path / "lo.png", lo), _save(tmp_path / "hi.png", hi))["mean"]
    assert got == pytest.approx(10 * math.log10(255.0 ** 2 / ((150 ** 2 + 200 ** 2) / 2)), abs=1e-9)
    assert got < 5.0


def test_ssim_matches_skimage_called_directly(capsys, images):
    from skimage.metrics import structural_similarity

    a, b, pa, pb = images
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    expected = structural_similarity(fa, fb, data_range=255.0, channel_axis=-1, win_size=7)
    assert _json_metric(capsys, "ssim", pa, pb)["mean"] == pytest.approx(expected, abs=1e-12)
    expected_g = structural_similarity(fa, fb, data_range=255.0, channel_axis=-1, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False)
    assert _json_metric(capsys, "ssim", pa, pb, "--ssim-gaussian")["mean"] == pytest.approx(expected_g, abs=1e-12)
    assert _json_metric(capsys, "ssim", pa, pa)["mean"] == pytest.approx(1.0)
    assert expected < 0.9


def test_folders_pair_by_name(capsys, tmp_path, images):
    a, b, _, _ = images
    ref, test = tmp_path / "ref", tmp_path / "test"
    ref.mkdir()
    test.mkdir()
    for k, name in enumerate(["img_10.png", "img_2.png", "img_1.png"]):
        _save(ref / name, np.roll(a, k, axis=0))
        _save(test / name, np.roll(b if k else a, k, axis=0))
    _save(test / "only_in_test.png", a)
    rc, out, err = run(capsys, "metrics", "psnr", str(ref), str(test), "--json")
    assert rc == 0 and "only_in_test.png" in err  # a note, not an error
    values = json.loads(out)["values"]
    assert list(values) == ["img_1.png", "img_2.png", "img_10.png"]  # natural order
    assert values["img_10.png"] == math.inf
    assert values["img_2.png"] == pytest.approx(_numpy_psnr(np.roll(a, 1, 0), np.roll(b, 1, 0)), abs=1e-9)
    rc, out, _ = run(capsys, "metrics", "psnr", str(ref), str(test))
    assert out.strip().splitlines()[-1].startswith("psnr: inf dB (mean of 3 pairs)")


def test_gif_video_frames_against_folder_of_frames(capsys, tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    frames = []
    for k, c in enumerate(colors):
        f = np.zeros((16, 16, 3), np.uint8)
        f[:, : 4 * (k + 1)] = c
        frames.append(f)
    gif = tmp_path / "clip.gif"
    Image.fromarray(frames[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                    duration=100, loop=0)
    # the frames as decoded by Pillow (independently of the CLI's reader)
    with Image.open(gif) as im:
        decoded = []
        for i in range(im.n_frames):
            im.seek(i)
            decoded.append(np.asarray(im.convert("RGB")))
    assert len(decoded) == 4
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(decoded):
        _save(folder / f"frame_{i}.png", f)
    res = _json_metric(capsys, "psnr", str(gif), str(folder))
    assert res["n"] == 4 and all(v == math.inf for v in res["values"].values())
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for i, f in enumerate(decoded):
        _save(shifted / f"frame_{i}.png", np.roll(f, 3, axis=1))
    res = _json_metric(capsys, "psnr", str(gif), str(shifted))
    expected = [_numpy_psnr(f, np.roll(f, 3, axis=1)) for f in decoded]
    assert list(res["values"].values()) == pytest.approx(expected, abs=1e-9)
    os.remove(shifted / "frame_3.png")
    rc, _, err = run(capsys, "metrics", "psnr", str(gif), str(shifted))
    assert_one_line_error(rc, err, "4 reference frame(s) but 3 test frame(s)")


def test_metrics_bad_inputs_are_one_line(capsys, tmp_path, images):
    _, _, pa, _ = images
    rc, _, err = run(capsys, "metrics", "psnr", pa, str(tmp_path / "missing.png"))
    assert_one_line_error(rc, err, "no such file or folder")
    small = _save(tmp_path / "small.png", np.zeros((8, 8, 3)))
    rc, _, err = run(capsys, "metrics", "psnr", pa, small)
    assert_one_line_error(rc, err, "40x48", "8x8")
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    rc, _, err = run(capsys, "metrics", "ssim", pa, str(txt))
    assert_one_line_error(rc, err, "unsupported file type")
    tiny = _save(tmp_path / "tiny.png", np.zeros((4, 4, 3)))
    rc, _, err = run(capsys, "metrics", "ssim", tiny, tiny)
    assert_one_line_error(rc, err, "ssim")
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    _save(d1 / "x.png", np.zeros((8, 8, 3)))
    _save(d2 / "y.png", np.zeros((8, 8, 3)))
    rc, _, err = run(capsys, "metrics", "mse", str(d1), str(d2))
    assert_one_line_error(rc, err, "no file names in common")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "metrics", "psnr", str(empty), str(d2))
    assert_one_line_error(rc, err, "no images or videos")


@pytest.mark.skipif(shutil.which("ffmpeg") is not None or any(
    __import__("importlib").util.find_spec(m) for m in ("imageio_ffmpeg", "av")), reason="an mp4 reader is installed")
def test_mp4_without_reader_says_what_to_install(capsys, tmp_path):
    mp4 = tmp_path / "v.mp4"
    mp4.write_bytes(b"\x00" * 64)
    rc, _, err = run(capsys, "metrics", "psnr", str(mp4), str(mp4))
    assert_one_line_error(rc, err, "imageio-ffmpeg", "folder of frames")


def test_lpips_without_local_weights_exits_with_how_to(capsys, images):
    from cachedit_fx.tools.metrics import LPIPS, MetricUnavailable

    try:
        LPIPS("alex")
    except MetricUnavailable:
        pass
    else:
        pytest.skip("LPIPS weights are available here")
    _, _, pa, pb = images
    rc, _, err = run(capsys, "metrics", "lpips", pa, pb)
    assert_one_line_error(rc, err, "lpips", "weights", code=3)


def test_lpips_wiring_with_a_stand_in_package(capsys, images, tmp_path, monkeypatch):
    """The real lpips weights are not here: a stand-in ``lpips`` module (mean |x - y| of its [-1, 1]
    inputs) and a placeholder backbone checkpoint check the plumbing: lookup, scaling, per-pair values."""
    import importlib.machinery
    import types

    calls = []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()
            calls.append(net)

        def forward(self, x, y):
            assert x.shape[:2] == (1, 3) and x.min() >= -1 and x.max() <= 1
            return (x - y).abs().mean().reshape(1, 1, 1, 1)

    for name, attrs in (("lpips", {"LPIPS": FakeLPIPS}), ("torchvision", {})):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        for k, v in attrs.items():
            setattr(mod, k, v)
        monkeypatch.setitem(sys.modules, name, mod)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    a, b, pa, pb = images
    rc, _, err = run(capsys, "metrics", "lpips", pa, pb)
    assert_one_line_error(rc, err, "alexnet-owt-7be5be79.pth", str(hub / "checkpoints"), code=3)
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"placeholder")
    got = _json_metric(capsys, "lpips", pa, pb)["mean"]
    expected = np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))) / 255.0 * 2
    assert got == pytest.approx(expected, rel=1e-5) and calls == ["alex"]


def test_clip_score_without_local_weights_exits_with_how_to(capsys, images, tmp_path):
    _, _, pa, pb = images
    rc, _, err = run(capsys, "metrics", "clip_score", pa, pb, "--clip-model", str(tmp_path / "no_clip_here"))
    assert_one_line_error(rc, err, "--clip-model", code=3)


def test_clip_score_with_a_local_model(capsys, tmp_path, images):
    """A tiny random CLIP saved locally stands in for real weights: identical images score 100."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from cachedit_fx.zoo.tokenizers import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    _, _, pa, pb = images
    same = _json_metric(capsys, "clip_score", pa, pa, "--clip-model", str(folder))
    assert same["mean"] == pytest.approx(100.0, abs=1e-3)
    other = _json_metric(capsys, "clip_score", pa, pb, "--clip-model", str(folder))
    assert 0.0 <= other["mean"] <= 100.0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    text = _json_metric(capsys, "clip_score", str(prompts), pb, "--clip-model", str(folder))
    assert text["n"] == 1 and 0.0 <= text["mean"] <= 100.0


def test_console_script_error_is_one_stderr_line(tmp_path):
    """The installed entry point, out of process: one line on stderr, nothing else, non-zero exit."""
    exe = shutil.which("cachedit-fx")
    cmd = [exe] if exe else [sys.executable, "-m", "cachedit_fx.tools.cli"]
    proc = subprocess.run(cmd + ["metrics", "psnr", str(tmp_path / "nope.png"), str(tmp_path / "nope2.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cachedit-fx metrics: no such file or folder: {tmp_path / 'nope.png'}"]


def test_export_dynamic_flag_parses_into_shared_dims():
    from torch.export import Dim

    from cachedit_fx.export.shapes import parse_cli

    spec = parse_cli(["hidden_states:1:tokens", "img_ids:0:tokens", "hidden_states:0"])
    assert spec["hidden_states"][1] is spec["img_ids"][0]
    assert isinstance(spec["hidden_states"][0], Dim) and spec["hidden_states"][0] is not spec["hidden_states"][1]


def test_export_bad_dynamic_flag_is_one_line_error(capsys, tmp_path):
    rc, _, err = run(capsys, "export", "--model", "flux", "--out", str(tmp_path / "m.pt2"), "--dynamic", "tokens")
    assert_one_line_error(rc, err, "--dynamic 'tokens'", "ARG:DIM")
    assert not (tmp_path / "m.pt2").exists()


def test_export_of_a_factory_model_errors_are_one_line(capsys, tmp_path):
    out = str(tmp_path / "m.pt2")
    rc, _, err = run(capsys, "export", "--out", out)
    assert_one_line_error(rc, err, "--model MODEL, or --config package.module:Factory")
    rc, _, err = run(capsys, "export", "--config", "tinydit:cross_dit", "--out", out)
    assert_one_line_error(rc, err, "--args NAME=SHAPE")
    rc, _, err = run(capsys, "export", "--config", "tinydit:cross_dit", "--args", "x=1xq", "--out", out)
    assert_one_line_error(rc, err, "expected NAME=SHAPE[:DTYPE]")
    rc, _, err = run(capsys, "export", "--config", "tinydit:no_such_factory", "--args", "x=1x8x16", "--out", out)
    assert_one_line_error(rc, err, "has no attribute 'no_such_factory'")
    assert not os.path.exists(out)
