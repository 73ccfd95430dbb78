"""cache-dit's vocabulary, so a cache-dit script runs unchanged: ``ForwardPattern``, ``steps_mask``,
``BlockAdapter`` and the ``CacheStats`` that ``summary()`` returns."""
