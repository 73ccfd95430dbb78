"""``cachedit-fx metrics``: PSNR / SSIM / MSE / LPIPS / CLIP score between images, folders or videos."""
from __future__ import annotations

import argparse
import json


def run(args) -> int:
    from .. import metrics as m

    result = m.compute(args.metric, args.ref, args.test, ssim_gaussian=args.ssim_gaussian,
                       lpips_net=args.lpips_net, clip_model=args.clip_model)
    m.print_notes(result)
    if args.json:
        print(json.dumps({"metric": result.metric, "mean": result.mean, "n": len(result.values),
                          "values": result.values}, indent=2))
    else:
        print(m.render(result, per_pair=True if args.per_pair else None))
    return 0


def register(sub) -> None:
    from ..metrics import DEFAULT_CLIP_MODEL, LPIPS_BACKBONES, METRICS, video_support

    p = sub.add_parser(
        "metrics", help="PSNR / SSIM / MSE / LPIPS / CLIP score between images, folders or videos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compare REF and TEST: image files, video files (every frame) or folders of images / videos.\n"
            "Two folders pair files by name; otherwise frames pair by index (a folder of images is a sequence\n"
            "of frames in natural order). Frames are read as 8-bit RGB and converted to float64 before any\n"
            "arithmetic; PSNR/MSE use the 0..255 scale (PSNR prints inf for identical frames). The summary\n"
            "is the mean over pairs.\n"
            f"{video_support()}\n"
            "psnr, ssim, mse: scikit-image (ssim: 7x7 uniform window; --ssim-gaussian: 11x11 Gaussian, sigma 1.5).\n"
            "lpips: the `lpips` package or torchmetrics, with the torchvision backbone weights already in the\n"
            "torch hub cache (TORCH_HOME); nothing is downloaded.\n"
            f"clip_score: 100 * max(cos, 0) of CLIP embeddings, with a CLIP model available locally\n"
            f"(--clip-model, default {DEFAULT_CLIP_MODEL} from the Hugging Face cache); REF may be a .txt file of\n"
            "prompts (one, or one per test frame) for the text-image score; otherwise image-image.\n"
            "Exit codes: 0 ok, 2 bad input, 3 metric unavailable here (the line says how to provide it)."))
    p.add_argument("metric", choices=METRICS)
    p.add_argument("ref", help="reference: image, video, folder (or a prompts .txt for clip_score)")
    p.add_argument("test", help="test: image, video or folder")
    p.add_argument("--json", action="store_true", help="print a JSON object (mean, per-pair values)")
    p.add_argument("--per-pair", action="store_true", help="print every pair's value, even for a single pair")
    p.add_argument("--ssim-gaussian", action="store_true", help="SSIM with Wang et al.'s Gaussian window")
    p.add_argument("--lpips-net", choices=sorted(LPIPS_BACKBONES), default="alex")
    p.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="local folder or Hugging Face cache id")
    p.set_defaults(func=run)
