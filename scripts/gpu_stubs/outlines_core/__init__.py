"""Stand-in for outlines_core: see llguidance beside it."""

from llguidance import stand_in

__getattr__ = stand_in("outlines_core")
