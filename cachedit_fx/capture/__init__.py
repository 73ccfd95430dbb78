"""Capture: a forward as the FX graph(s) Dynamo makes of it (``dynamo.py``), submodules that break the
graph inside every block made opaque ops (``islands.py``), and the facts the passes read off a Dynamo
graph (``fx_facts.py``)."""
