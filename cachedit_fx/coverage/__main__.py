"""``python -m cachedit_fx.coverage [--write] [CLASS ...]``: run the coverage matrix and print it;
``--write`` stores the package's ``matrix.json`` and regenerates ``docs/coverage.md`` (all classes)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

COMMAND = "python -m cachedit_fx.coverage --write"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachedit_fx.coverage", description=__doc__)
    parser.add_argument("classes", nargs="*", help="transformer class names (default: all)")
    parser.add_argument("--write", action="store_true", help="write matrix.json and docs/coverage.md")
    parser.add_argument("--no-backend", action="store_true", help="skip the torch.compile(backend='cachedit') path")
    parser.add_argument("--docs", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs", "coverage.md"))
    args = parser.parse_args(argv)
    if args.write and args.classes:
        parser.error("--write runs every class; leave out the class names")
    import diffusers

    from . import catalog, document, matrix

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = [r.to_json() for r in matrix.run_all(args.classes or None, backend=not args.no_backend,
                                                log=lambda s: print(s, flush=True))]
    counts = document.summary_counts(rows)
    print(f"{counts['classes']} classes, {counts['dits']} DiTs, {counts['cache']} cache ({counts['percent']}%)")
    if args.write:
        versions = {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]}
        document.write_json(rows, catalog.pipelines_by_transformer(), versions)
        with open(args.docs, "w") as f:
            f.write(document.markdown(document.read_json(), COMMAND))
        print(f"wrote {document.JSON_PATH} and {os.path.normpath(args.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
