"""Helpers shared by the test subpackages: the eager oracle of docs/algorithm.md (``oracle``), tiny
hand-written DiTs and their loops (``tinydit``), the per-test compile (``dynamo.compile_own``) and the
command line driver (``cli``)."""
