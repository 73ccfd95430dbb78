"""What the command line's subcommands share: quiet library logging, output checks, the model and
cache arguments, and the error a command raises when nothing cached."""
from __future__ import annotations

import os
import re


class NothingCached(RuntimeError):
    """A command ran but nothing cached (exit 1, one line)."""


class quiet_libraries:
    """Silence library chatter (transformers / diffusers warnings while the tiny zoo models build,
    deprecation warnings, Dynamo's recompile notes) so stdout is the report and stderr stays for
    this command's own one-line errors."""

    def __enter__(self):
        import logging
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._levels = []
        for name in ("transformers", "diffusers"):
            try:  # configures the library's root logger now, so a later lazy setup cannot reset it
                __import__(f"{name}.utils.logging", fromlist=["get_logger"]).get_logger()
            except ImportError:
                pass
        for name in ("transformers", "diffusers", "torch._dynamo"):
            log = logging.getLogger(name)
            self._levels.append((log, log.level))
            log.setLevel(logging.ERROR)
        from diffusers.utils import logging as diffusers_logging

        self._bars = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."
        return self

    def __exit__(self, *exc):
        from diffusers.utils import logging as diffusers_logging

        if self._bars:
            diffusers_logging.enable_progress_bar()
        for log, level in self._levels:
            log.setLevel(level)
        self._warnings.__exit__(*exc)
        return False


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(name))).strip("_") or "model"


def check_out_dir(path: str | None) -> None:
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"output folder does not exist: {folder}")


MODEL_HELP = ("a zoo model name (flux, wan, ...: see cachedit_fx.zoo.FAMILY_NAMES), package.module:Class "
              "with --config cfg.json (random weights), or a local diffusers model folder (config.json with "
              "_class_name; loaded with from_pretrained, no network)")
CONFIG_HELP = ("a diffusers-style config JSON for a package.module:Class MODEL; example inputs come from the zoo "
               "family with that transformer class")


def add_model_args(p) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--config", help=CONFIG_HELP)
    add_split_args(p)


def add_split_args(p) -> None:
    p.add_argument("--fn", type=int, default=1, help="Fn_compute_blocks (default 1)")
    p.add_argument("--bn", type=int, default=0, help="Bn_compute_blocks (default 0)")


def add_cache_args(p, warmup: int) -> None:
    p.add_argument("--threshold", type=float, default=0.08, help="residual_diff_threshold (default 0.08)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"max_warmup_steps (default {warmup})")
    p.add_argument("--taylorseer", type=int, default=0, metavar="ORDER", help="TaylorSeer order (default 0: off)")
