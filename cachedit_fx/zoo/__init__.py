"""Tiny, seeded, randomly initialised diffusers pipelines and transformers, built fully offline: the
one place the tests, the demo, the CLI, the coverage run and the benchmarks get models from.

Each family lives in ``recipes/<name>.py`` and exposes ``FAMILY``, a :class:`Family`. The tokenizers
and text encoders are built in code (``tokenizers.py``, ``components.py``; the ``[zoo]`` extra).
"""
from .build import build_pipeline, build_transformer, families, family_for_transformer, get, run_pipeline
from .denoise import denoise
from .family import FAMILY_NAMES, ZOO_MODULES, Family

__all__ = ["FAMILY_NAMES", "Family", "ZOO_MODULES", "build_pipeline", "build_transformer", "denoise", "families",
           "family_for_transformer", "get", "run_pipeline"]
