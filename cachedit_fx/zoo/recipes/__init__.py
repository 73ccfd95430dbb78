"""One module per zoo family; each defines ``FAMILY`` (see cachedit_fx.zoo.Family)."""
