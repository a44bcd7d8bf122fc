"""Stand-in for QuACK (``quack``): see ``cutlass`` beside it."""

import sys

import cutlass  # installs the stand-in's finder, which serves quack's submodules too

sys.modules[__name__].__class__ = type(cutlass)
