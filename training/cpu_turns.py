"""Optional cooperative CPU sharing between training and a timed benchmark (``$MELANOMA_CPU_LOCK``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

__all__ = ["CPU_LOCK_ENV", "CpuTurns"]

CPU_LOCK_ENV = "MELANOMA_CPU_LOCK"


class CpuTurns:
    """Optional cooperative CPU sharing: when ``$MELANOMA_CPU_LOCK`` names a file, every epoch
    and every chunk of cached activations runs under a shared ``flock`` of it, so a timed
    benchmark elsewhere can take it exclusively between two of them. ``waited`` adds up the
    seconds spent waiting (they are kept out of the time budget)."""

    waited = 0.0

    @classmethod
    @contextlib.contextmanager
    def turn(cls):
        path = os.environ.get(CPU_LOCK_ENV)
        if not path:
            yield
            return
        with open(path, "a") as handle:
            asked = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_SH)
            cls.waited += time.perf_counter() - asked
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
