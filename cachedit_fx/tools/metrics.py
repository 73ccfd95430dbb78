"""Image / video quality metrics for ``cachedit-fx metrics``: PSNR, SSIM, MSE (scikit-image), LPIPS and
CLIP score (only with locally available weights; nothing is downloaded).

Inputs: an image file, a video file (its frames), or a folder of images / videos. Two folders pair
their files by name; otherwise frames pair by index. Every frame is read as 8-bit RGB and converted
to float64 before any arithmetic (no uint8 wrap-around); PSNR / MSE use the 0..255 scale.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from ..errors import MissingDependency

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GIF_EXTS = (".gif",)
FFMPEG_EXTS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v")
VIDEO_EXTS = GIF_EXTS + FFMPEG_EXTS
METRICS = ("psnr", "ssim", "mse", "lpips", "clip_score")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mse": False, "lpips": False, "clip_score": True}
UNITS = {"psnr": " dB"}

LPIPS_BACKBONES = {  # torchvision checkpoints the LPIPS nets are built on (torch hub cache file names)
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class MetricError(ValueError):
    """A bad input (path, size, pairing): the CLI prints the message as one line and exits 2."""


class MetricUnavailable(MissingDependency):
    """A metric whose package or weights are not available locally: the CLI prints how to provide them."""


# ----------------------------------------------------------------------------- reading


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def video_support() -> str:
    """One sentence for --help: which video files can be read here."""
    ffmpeg = [m for m in ("imageio_ffmpeg", "av") if has_module(m)]
    gif = "GIF via imageio's Pillow plugin" if has_module("imageio") else "GIF via Pillow"
    if ffmpeg:
        return (f"Videos: {gif}; {'/'.join(e.lstrip('.') for e in FFMPEG_EXTS)} via imageio + "
                f"{' / '.join(ffmpeg)} (installed here).")
    return (f"Videos: {gif} (installed here); {'/'.join(e.lstrip('.') for e in FFMPEG_EXTS)} need "
            "imageio-ffmpeg or PyAV (pip install 'imageio[ffmpeg]'), which are NOT installed here: "
            "pass folders of frames instead.")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _to_rgb_uint8(a: np.ndarray, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise MetricError(f"{where}: frames of dtype {a.dtype} are not supported; use 8-bit images or videos")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise MetricError(f"{where}: unsupported frame shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise MetricError(f"{path}: {im.mode} (16-bit / float) images are not supported; save 8-bit RGB")
            return _to_rgb_uint8(np.asarray(im.convert("RGB")), path)
    except UnidentifiedImageError:
        raise MetricError(f"{path}: not a readable image") from None


def read_video(path: str) -> list[np.ndarray]:
    ext = os.path.splitext(path)[1].lower()
    if ext in FFMPEG_EXTS and not (has_module("imageio_ffmpeg") or has_module("av")):
        raise MetricError(f"{path}: reading {ext} needs imageio-ffmpeg or PyAV (pip install 'imageio[ffmpeg]'); "
                          "or pass a folder of frames")
    try:
        import imageio.v3 as iio

        frames = iio.imread(path, index=None)
    except ImportError:
        if ext not in GIF_EXTS:
            raise MetricError(f"{path}: reading {ext} needs imageio (pip install imageio)") from None
        frames = _read_gif_pillow(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input
        raise MetricError(f"{path}: cannot read video ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    frames = np.asarray(frames)
    if frames.ndim == 3 and frames.shape[-1] in (3, 4):  # a single colour frame
        frames = frames[None]
    if frames.ndim == 2:  # a single grey frame
        frames = frames[None]
    return [_to_rgb_uint8(f, f"{path}[{i}]") for i, f in enumerate(frames)]


def _read_gif_pillow(path: str) -> list[np.ndarray]:
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]


def _kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTS:
        return "video"
    return "image"


@dataclass
class Item:
    """One media file: a name to pair on and its frames (read lazily)."""

    name: str
    path: str
    _frames: list | None = field(default=None, repr=False)

    @property
    def frames(self) -> list[np.ndarray]:
        if self._frames is None:
            self._frames = read_video(self.path) if _kind(self.path) == "video" else [read_image(self.path)]
        return self._frames


def _items(path: str) -> list[Item]:
    if os.path.isdir(path):
        names = sorted((f for f in os.listdir(path)
                        if os.path.splitext(f)[1].lower() in IMAGE_EXTS + VIDEO_EXTS
                        and os.path.isfile(os.path.join(path, f))), key=_natural_key)
        if not names:
            raise MetricError(f"{path}: folder holds no images or videos ({', '.join(IMAGE_EXTS + VIDEO_EXTS)})")
        return [Item(n, os.path.join(path, n)) for n in names]
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in IMAGE_EXTS + VIDEO_EXTS:
            raise MetricError(f"{path}: unsupported file type {ext or '(none)'}; "
                              f"images: {' '.join(IMAGE_EXTS)}; videos: {' '.join(VIDEO_EXTS)}")
        return [Item(os.path.basename(path), path)]
    raise MetricError(f"no such file or folder: {path}")


def pair_frames(ref: str, test: str) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    """(name, ref frame, test frame) pairs and notes (files left unpaired).

    Two folders pair files by name (then by name without extension); anything else pairs frames by
    index (an image is one frame; a folder of images is a sequence of frames in natural order)."""
    ref_items, test_items = _items(ref), _items(test)
    notes: list[str] = []
    if os.path.isdir(ref) and os.path.isdir(test):
        by_name = {i.name: i for i in test_items}
        by_stem = {os.path.splitext(i.name)[0]: i for i in test_items}
        matched, used = [], set()
        for r in ref_items:
            t = by_name.get(r.name) or by_stem.get(os.path.splitext(r.name)[0])
            if t is not None and t.name not in used:
                matched.append((r, t))
                used.add(t.name)
        if not matched:
            raise MetricError(f"no file names in common between {ref} and {test}")
        unpaired = [r.name for r in ref_items if r not in [m[0] for m in matched]] + \
                   [t.name for t in test_items if t.name not in used]
        if unpaired:
            notes.append(f"skipped {len(unpaired)} unpaired file(s): {', '.join(unpaired[:5])}"
                         f"{' ...' if len(unpaired) > 5 else ''}")
        groups = [(r.name if r.name == t.name else f"{r.name}|{t.name}", r.frames, t.frames) for r, t in matched]
    else:
        groups = [(os.path.basename(os.path.normpath(ref)), [f for i in ref_items for f in i.frames],
                   [f for i in test_items for f in i.frames])]
    pairs = []
    for name, rf, tf in groups:
        if len(rf) != len(tf):
            raise MetricError(f"{name}: {len(rf)} reference frame(s) but {len(tf)} test frame(s)")
        for k, (a, b) in enumerate(zip(rf, tf)):
            label = name if len(rf) == 1 else f"{name}[{k}]"
            if a.shape != b.shape:
                raise MetricError(f"{label}: reference is {a.shape[1]}x{a.shape[0]} but test is "
                                  f"{b.shape[1]}x{b.shape[0]}; resize to the same size first")
            pairs.append((label, a, b))
    return pairs, notes


# ----------------------------------------------------------------------------- metrics


def _f(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _skimage_metrics():
    try:
        from skimage import metrics
    except ImportError:
        raise MetricUnavailable("ssim is computed with scikit-image, which is not installed: "
                                "pip install 'cachedit-fx[cli]'") from None
    return metrics


def mse(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean squared error over all pixels and channels, in float64."""
    return float(np.mean((_f(ref) - _f(test)) ** 2))


def psnr(ref: np.ndarray, test: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB over all pixels and channels (``data_range``: 255 for 8-bit frames, 1 for images in
    [0, 1]); ``inf`` for identical frames. The one PSNR of the package: the CLI, ``tune``, the demo and
    the benchmarks all use it."""
    err = mse(ref, test)
    return math.inf if err == 0 else 10.0 * math.log10(data_range ** 2 / err)


SSIM_DEFAULTS = dict(data_range=255.0, channel_axis=-1, win_size=7, gaussian_weights=False)
SSIM_GAUSSIAN = dict(data_range=255.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                     use_sample_covariance=False)


def ssim(ref: np.ndarray, test: np.ndarray, gaussian: bool = False) -> float:
    """Mean SSIM over the image, channels averaged: scikit-image's structural_similarity with a 7x7
    uniform window (``gaussian=True``: Wang et al.'s 11x11 Gaussian window, sigma 1.5)."""
    structural_similarity = _skimage_metrics().structural_similarity
    try:
        return float(structural_similarity(_f(ref), _f(test), **(SSIM_GAUSSIAN if gaussian else SSIM_DEFAULTS)))
    except ValueError as e:
        raise MetricError(f"ssim: {e} (frames are {ref.shape[1]}x{ref.shape[0]})") from None


def batch_ssim(ref, test) -> float:
    """Mean :func:`ssim` over a batch of ``(B, C, H, W)`` images in [0, 1] (a pipeline's "pt" output)."""
    ref, test = (np.asarray(x, dtype=np.float64).transpose(0, 2, 3, 1) * 255.0 for x in (ref, test))
    if ref.shape != test.shape:
        raise MetricError(f"ssim: batches of shapes {ref.shape} and {test.shape} differ")
    return float(np.mean([ssim(a, b) for a, b in zip(ref, test)]))


class LPIPS:
    """LPIPS distance with the ``lpips`` package or torchmetrics, from locally cached weights only."""

    def __init__(self, net: str = "alex"):
        import torch

        if net not in LPIPS_BACKBONES:
            raise MetricError(f"lpips: --lpips-net must be one of {sorted(LPIPS_BACKBONES)}")
        fname, url = LPIPS_BACKBONES[net]
        ckpt = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
        backends = [m for m in ("lpips", "torchmetrics") if has_module(m)]
        if not backends or not has_module("torchvision"):
            raise MetricUnavailable(
                "lpips needs the `lpips` package (or torchmetrics[image]) and torchvision, plus the torchvision "
                f"{net} weights {fname} in {os.path.dirname(ckpt)}: pip install lpips torchvision, and copy "
                f"{url} there (no download is attempted here)")
        if not os.path.isfile(ckpt):
            raise MetricUnavailable(
                f"lpips needs the torchvision {net} weights at {ckpt} (no download is attempted here): fetch {url} "
                "on a machine with network and copy it there, or point TORCH_HOME at a cache that has it")
        self.torch = torch
        if backends[0] == "lpips":
            import lpips

            self.model = lpips.LPIPS(net=net, verbose=False).eval()
            self.scale = "pm1"
        else:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.model = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).eval()
            self.scale = "01"

    def __call__(self, ref: np.ndarray, test: np.ndarray) -> float:
        torch = self.torch

        def t(a):
            x = torch.from_numpy(_f(a) / 255.0).float().permute(2, 0, 1)[None]
            return x * 2 - 1 if self.scale == "pm1" else x

        with torch.no_grad():
            return float(self.model(t(ref), t(test)).reshape(-1)[0])


class CLIPScore:
    """100 * max(cos(CLIP embedding a, CLIP embedding b), 0) with a locally available CLIP model
    (transformers CLIPModel + its processor; ``local_files_only``)."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        hint = (f"clip_score needs CLIP weights available locally (no download is attempted here): pass "
                f"--clip-model DIR (a folder with a transformers CLIPModel and its CLIPProcessor, e.g. "
                f"{DEFAULT_CLIP_MODEL} saved with save_pretrained) or put {model} in the Hugging Face cache "
                f"(HF_HOME) on a machine with network")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MetricUnavailable(f"{hint} ({detail})" if os.path.isdir(model) else hint) from None
        self.torch = torch

    def _unit(self, x):
        x = x.pooler_output if hasattr(x, "pooler_output") and not isinstance(x, self.torch.Tensor) else x
        return x / x.norm(dim=-1, keepdim=True)

    def image_embeds(self, frames: list[np.ndarray]):
        with self.torch.no_grad():
            inputs = self.processor(images=list(frames), return_tensors="pt")
            return self._unit(self.model.get_image_features(pixel_values=inputs["pixel_values"]))

    def text_embeds(self, texts: list[str]):
        with self.torch.no_grad():
            inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
            return self._unit(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs["attention_mask"]))

    @staticmethod
    def score(a, b) -> list[float]:
        return [float(100.0 * max(v, 0.0)) for v in (a * b).sum(dim=-1).tolist()]


def read_prompts(path: str, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise MetricError(f"{path}: no prompts (one prompt per line)")
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise MetricError(f"{path}: {len(lines)} prompts for {n} test frame(s); give one prompt, or one per frame "
                          "in the test files' sorted order")
    return lines


# ----------------------------------------------------------------------------- driver


@dataclass
class Result:
    metric: str
    values: dict[str, float]
    notes: list[str]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values()))) if self.values else math.nan


def compute(metric: str, ref: str, test: str, *, ssim_gaussian: bool = False, lpips_net: str = "alex",
            clip_model: str = DEFAULT_CLIP_MODEL) -> Result:
    if metric not in METRICS:
        raise MetricError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "clip_score" and os.path.splitext(ref)[1].lower() == ".txt":
        if not os.path.isfile(ref):
            raise MetricError(f"no such file or folder: {ref}")
        frames = [(f"{i.name}" if len(i.frames) == 1 else f"{i.name}[{k}]", f)
                  for i in _items(test) for k, f in enumerate(i.frames)]
        prompts = read_prompts(ref, len(frames))
        scorer = CLIPScore(clip_model)
        vals = scorer.score(scorer.image_embeds([f for _, f in frames]), scorer.text_embeds(prompts))
        return Result(metric, {name: v for (name, _), v in zip(frames, vals)}, [])
    pairs, notes = pair_frames(ref, test)
    if metric == "clip_score":
        scorer = CLIPScore(clip_model)
        vals = scorer.score(scorer.image_embeds([a for _, a, _ in pairs]), scorer.image_embeds([b for _, _, b in pairs]))
        return Result(metric, {name: v for (name, _, _), v in zip(pairs, vals)}, notes)
    if metric == "lpips":
        fn = LPIPS(lpips_net)
    elif metric == "ssim":
        def fn(a, b):
            return ssim(a, b, gaussian=ssim_gaussian)
    else:
        fn = {"psnr": psnr, "mse": mse}[metric]
    return Result(metric, {name: fn(a, b) for name, a, b in pairs}, notes)


def fmt(value: float, metric: str) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6f}" if metric in ("ssim", "lpips") else f"{value:.4f}"


def render(result: Result, per_pair: bool | None = None) -> str:
    lines = []
    many = len(result.values) > 1
    if per_pair or (per_pair is None and many):
        width = max(len(k) for k in result.values)
        lines += [f"{k:<{width}}  {fmt(v, result.metric)}" for k, v in result.values.items()]
    unit = UNITS.get(result.metric, "")
    tail = f" (mean of {len(result.values)} pairs)" if many else ""
    lines.append(f"{result.metric}: {fmt(result.mean, result.metric)}{unit}{tail}")
    return "\n".join(lines)


def print_notes(result: Result) -> None:
    for n in result.notes:
        print(f"note: {n}", file=sys.stderr)
