"""The ``cachedit`` Dynamo backend (``dynamo.py``), its options (``options.py``) and the inner compilers
the rewritten graph is handed to (``inner.py``)."""
from .dynamo import cachedit_backend
from .options import BackendOptions, parse_options

__all__ = ["BackendOptions", "cachedit_backend", "parse_options"]
