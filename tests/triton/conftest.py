"""Triton's interpreter refuses a tl.load/tl.store mask that is not boolean since 3.9; older ones cast
it silently. Every Triton version is held to the strict rule here, so that a mask which only the newer
interpreter would reject fails on any of them."""
import os

import numpy as np
import pytest

# Position of the mask among each builder method's arguments after ``self``.
_MASK_ARG = {"create_masked_load": 1, "create_masked_store": 2}


@pytest.fixture(autouse=True)
def _boolean_masks_only(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    from triton.runtime import interpreter
    for name, position in _MASK_ARG.items():
        original = getattr(interpreter.InterpreterBuilder, name)

        def strict(self, *args, _original=original, _name=name, _position=position):
            mask = args[_position].data
            if mask.dtype != np.bool_:
                raise TypeError(f"{_name}: mask must be boolean, got a {mask.dtype} array")
            return _original(self, *args)

        monkeypatch.setattr(interpreter.InterpreterBuilder, name, strict)
