"""Run the Triton kernels under the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported; nothing imports
it before this conftest (kvmarina.kernels imports triton lazily).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
