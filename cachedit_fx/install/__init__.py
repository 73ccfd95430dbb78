"""Installing the cache on a model: the one-line API (``api.py``), the diffusers hook that routes each
call by mode (``hook.py``, ``modes.py``), the graph path with islands (``graph.py``), the eager cache and
the switch to it (``eager.py``, ``eager_switch.py``), what a call's arguments say (``calls.py``) and the
offload hooks that send a model to the eager cache (``offload.py``)."""
