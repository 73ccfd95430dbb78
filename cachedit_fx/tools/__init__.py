"""The tools around the cache: the ``cachedit-fx`` command line (``cli.py``, one module per subcommand
in ``commands/``), the graph report and its renderers (``report.py``, ``render.py``), image metrics
(``metrics.py``), threshold tuning (``tune.py``) and model loading for the CLI (``models.py``)."""
