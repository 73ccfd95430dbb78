"""One module per ``cachedit-fx`` subcommand, each with ``register(subparsers)`` and ``run(args)``."""
