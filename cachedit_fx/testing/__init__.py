"""Offline test helpers: the tiny model zoo and in-code tokenizers."""
