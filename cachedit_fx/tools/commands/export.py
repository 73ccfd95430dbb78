"""``cachedit-fx export``: a cached transformer as an AOTInductor package (.pt2)."""
from __future__ import annotations

from .common import CONFIG_HELP, MODEL_HELP, add_cache_args, add_split_args, quiet_libraries


def run(args) -> int:
    from ...export import export
    from ...export.shapes import parse_cli
    from ..models import example_tensors, is_import_path, load_model, model_from_factory

    dynamic = parse_cli(args.dynamic or [])
    if args.model is None and not is_import_path(args.config):
        raise ValueError("export needs --model MODEL, or --config package.module:Factory with --args")
    if args.args and args.model is not None:
        raise ValueError("--args gives the example call of a --config factory's model; zoo and class models "
                         "come with theirs")
    with quiet_libraries():
        if args.model is None:
            if not args.args:
                raise ValueError("--config package.module:Factory needs the example call: --args NAME=SHAPE ...")
            transformer, inputs = model_from_factory(args.config), example_tensors(args.args)
        else:
            model = load_model(args.model, args.config)
            transformer, inputs = model.transformer, dict(model.inputs)
        calib = {"taylorseer_order": args.taylorseer} if args.taylorseer else None
        path = export(transformer, example_kwargs=inputs, path=args.out, calibrator_config=calib,
                      cache_config={"Fn_compute_blocks": args.fn, "Bn_compute_blocks": args.bn,
                                    "residual_diff_threshold": args.threshold, "max_warmup_steps": args.warmup},
                      dynamic_shapes=dynamic)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a cached transformer as an AOTInductor package (.pt2)",
        description="torch.export the transformer with the cache decision inside the program and package it with "
                    "AOTInductor. The package serves the example call's shapes, or any size along the --dynamic "
                    "dims; load it with cachedit_fx.load(path) and use it as pipe.transformer.")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--config", help=CONFIG_HELP + "; or, without --model, package.module:Factory: a callable "
                                                  "returning the module to export (with --args)")
    p.add_argument("--args", action="append", metavar="NAME=SHAPE[:DTYPE]",
                   help="an example tensor argument of a --config factory's model, by forward parameter name "
                        "(repeatable; floats uniform in [0, 1), integers zero), e.g. --args x=1x64x16 --args t=1")
    p.add_argument("--out", default="model.pt2")
    p.add_argument("--dynamic", action="append", metavar="ARG:DIM[:NAME]",
                   help="let dimension DIM of forward argument ARG vary (repeatable; items with the same NAME share "
                        "one size, e.g. --dynamic hidden_states:1:tokens --dynamic img_ids:0:tokens)")
    add_split_args(p)
    add_cache_args(p, warmup=8)
    p.set_defaults(func=run)
