"""What runs at every call: the state layout (``layout.py``), the algorithm as pure tensor functions
(``algorithm.py``), the per-call glue around the cond (``step.py``), the state tensors
(``chain_state.py``), what one install compiled (``handle.py``), the ranks of a context-parallel
group (``ranks.py``) and the statistics read back after a run (``stats.py``)."""
