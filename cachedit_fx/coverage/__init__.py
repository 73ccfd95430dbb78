"""The coverage matrix: every transformer class in the installed diffusers run tiny (``catalog.py``,
``tiny.py``, ``inputs.py``, ``matrix.py``), written as ``matrix.json`` and ``docs/coverage.md``
(``document.py``), and read back by ``supported_pipelines`` / ``supported_matrix`` (``status.py``)."""
