"""How a block is called: which of the streams H (``hidden_states``) and E (``encoder_hidden_states``) it
takes and returns, in which order. The numbering and attributes are cache-dit's, so a ``BlockAdapter``
written for cache-dit pins a chain here too; the passes find the pattern from the graph's dataflow."""
from __future__ import annotations

import enum

_H, _E = "hidden_states", "encoder_hidden_states"


class ForwardPattern(enum.Enum):
    """Pattern_0 … Pattern_5. ``int(p)`` is the number; ``In`` / ``Out`` the stream names in order."""

    #            number  Return_H_First  Return_H_Only  Forward_H_only  In         Out
    Pattern_0 = (0,      True,           False,         False,          (_H, _E),  (_H, _E))
    Pattern_1 = (1,      False,          False,         False,          (_H, _E),  (_E, _H))
    Pattern_2 = (2,      False,          True,          False,          (_H, _E),  (_H,))
    Pattern_3 = (3,      False,          True,          True,           (_H,),     (_H,))
    Pattern_4 = (4,      True,           False,         True,           (_H,),     (_H, _E))
    Pattern_5 = (5,      False,          False,         True,           (_H,),     (_E, _H))

    def __init__(self, number, return_h_first, return_h_only, forward_h_only, inputs, outputs):
        self.number = number
        self.Return_H_First = return_h_first
        self.Return_H_Only = return_h_only
        self.Forward_H_only = forward_h_only
        self.In = inputs
        self.Out = outputs
        self.Supported = True

    def __int__(self) -> int:
        return self.number

    def __str__(self) -> str:
        return str(self.number)

    @classmethod
    def of(cls, number: int) -> "ForwardPattern":
        return next(p for p in cls if p.number == number)

    @staticmethod
    def supported_patterns() -> list["ForwardPattern"]:
        return list(ForwardPattern)
