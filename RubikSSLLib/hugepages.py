"""Large CPU tensors on transparent huge pages (Linux): torch's allocator asks the kernel for 2 MiB pages for blocks
of 2 MiB and more when THP_MEM_ALLOC_ENABLE=1 is in the environment at its first allocation (c10's alloc_cpu).

Why: a training step allocates its activations and gradients afresh, and glibc hands blocks this large back to the
kernel, so every step faults them in again 4 KiB at a time. On one thread a Rubik step on 8 x 64³ cubes spent more
time in those faults (inside ReLU's and batch norm's backward, and the zero fills) than in its convolutions
(RESULTS §22). No torch import here: this must run before torch's first allocation."""

from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def request() -> bool:
    """Ask for huge pages unless the user set VARIABLE or torch is already imported (too late: the setting is read
    once). True if this call set it."""
    if VARIABLE in os.environ or "torch" in sys.modules:
        return False
    os.environ[VARIABLE] = "1"
    return True
