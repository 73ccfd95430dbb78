"""The chain state's layout: every field round-trips by name, with its shape and what clears it."""
from __future__ import annotations

import torch

from cachedit_fx.runtime.layout import BranchBy, ChainLayout, StreamSpec


def test_layout_round_trips_every_field_by_name():
    layout = ChainLayout(2, 3, (3, 8, 16), torch.bfloat16, (StreamSpec((3, 8, 16), torch.float16, 3),),
                         diff_shared=True, branch_by=BranchBy.TIMESTEP, capacity=64)
    again = ChainLayout.from_dict(layout.to_dict())
    assert again == layout
    assert [f.name for f in again.fields()][-2:] == ["ref", "ladder_0"]
    assert {f.name for f in layout.fields() if f.clear == "context"} >= {"calls", "has_ref", "diff_log"}
    assert layout.shapes()["ladder_0"] == ((2, 3, 3, 8, 16), torch.float16)
