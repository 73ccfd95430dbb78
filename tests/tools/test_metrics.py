"""``cachedit-fx metrics``: PSNR / SSIM / MSE against independent computations, folders and videos
paired frame by frame, LPIPS / CLIP score only with local weights; bad inputs on one line."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.cli import assert_one_line_error, run


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
