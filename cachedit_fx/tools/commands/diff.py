"""``cachedit-fx diff``: what the passes do to a model's graph (text, json, dot, png, svg)."""
from __future__ import annotations

import os

DIFF_FORMATS = ("text", "json", "dot", "png", "svg")

from .common import add_model_args, check_out_dir, quiet_libraries, safe_name


def run(args) -> int:
    from ..models import load_model
    from ..render import render_dot, render_image, render_json, render_text
    from ..report import describe

    fmt = args.format
    if fmt is None:
        ext = os.path.splitext(args.out or "")[1].lstrip(".").lower()
        fmt = ext if ext in DIFF_FORMATS else "text"
    if fmt in ("png", "svg") and args.out and os.path.splitext(args.out)[1].lower() not in ("", f".{fmt}"):
        raise ValueError(f"--out {args.out} does not end in .{fmt}")
    check_out_dir(args.out)
    with quiet_libraries():
        model = load_model(args.model, args.config)
        report = describe(model.transformer, model.inputs, fn=args.fn, bn=args.bn, separate_cfg=args.separate_cfg)
    if fmt in ("png", "svg"):
        out = args.out or f"cachedit_diff_{safe_name(args.model)}.{fmt}"
        render_image(report, out, fmt, title=model.label)
        print(f"wrote {out}")
        return 0
    if fmt == "json":
        text = render_json(report)
    elif fmt == "dot":
        text = render_dot(report, title=model.label)
    else:
        text = render_text(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "diff", help="show what the passes do to a model's graph (text, json, dot, png, svg)",
        description="Show what the passes do to a model's graph: the chain found, its pattern, the Fn | middle | Bn "
                    "cut, the carried tensors, the inserted nodes (pre_step, cond, post_step) and the state. "
                    "dot emits Graphviz text (no Graphviz needed); png/svg are laid out by Graphviz's `dot` program "
                    "(exit 3 with how to install it when it is missing). Unmatched models print the reason and "
                    "exit 0.")
    add_model_args(p)
    p.add_argument("--separate-cfg", action="store_true", help="state for two CFG branches")
    p.add_argument("--format", choices=DIFF_FORMATS, default=None,
                   help="default: from --out's extension, else text")
    p.add_argument("--out", help="write to this file (png/svg default: cachedit_diff_MODEL.FORMAT)")
    p.set_defaults(func=run)
