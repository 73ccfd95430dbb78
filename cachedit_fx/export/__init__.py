"""Ahead-of-time export of the cached transformer: torch.export + an AOTInductor package with the cache
decision inside (``package.py``), the loaded package that drops into a pipeline (``loaded.py``), the
call's and output's structure (``callspec.py``) and the dynamic dims and state shapes (``shapes.py``)."""
from .loaded import CachedTransformer, load
from .package import export, export_program

__all__ = ["CachedTransformer", "export", "export_program", "load"]
