"""Test-session settings.

Triton decides when a kernel is *defined* (module import) whether it runs in the interpreter, so the
interpreter is switched on here, before any test imports `kernels`. On a machine with a GPU, run the
suite with TRITON_INTERPRET=0 to test the compiled kernels instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
