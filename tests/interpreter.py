"""`interpreted`: the mark of tests that run the repository's Triton kernels in Triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 where there is no CUDA; on a GPU those tests skip, and tests/gpu
and bench/gpu_check.py run the compiled kernels instead.
"""

import os

import numpy as np
import pytest

from blt_runtime.attention import triton_importable


def _interpreter_works() -> str | None:
    """Why the kernels cannot run here, or None."""
    if not triton_importable():
        return "Triton is not installed (the test extra installs it)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "a GPU is present: tests/gpu runs the compiled kernels"
    import triton
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 7) and int(np.__version__.split(".")[0]) >= 2:
        return f"Triton {triton.__version__}'s interpreter cannot take a loop bound from an argument under NumPy 2"
    return None


interpreted = pytest.mark.skipif(_interpreter_works() is not None, reason=str(_interpreter_works()))
