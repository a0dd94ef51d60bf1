"""What a run records about its machine: the vector extensions and the numerics fingerprint."""

from __future__ import annotations

import os

import pytest

from tests.fresh_python import run_python
from training.machine import VECTOR_FLAGS, cpu_vector_flags, numerics_fingerprint

FINGERPRINT = "from training.machine import numerics_fingerprint; print(numerics_fingerprint())"


def test_vector_flags_are_known_ones_in_order():
    flags = cpu_vector_flags()
    assert flags == [flag for flag in VECTOR_FLAGS if flag in flags]


def test_fingerprint_repeats_in_a_fresh_process():
    first = numerics_fingerprint()
    assert len(first) == 16 and int(first, 16) >= 0
    assert run_python(FINGERPRINT, dict(os.environ)) == first


def test_fingerprint_tells_another_kernel_path_apart():
    # Capping oneDNN at plain AVX makes this machine compute as an AVX-only CPU would: the
    # fingerprint must see it, or it could not tell two machines' arithmetic apart.
    if "avx2" not in cpu_vector_flags():
        pytest.skip("this CPU has no AVX2: there is no lower kernel path to compare with")
    capped = run_python(FINGERPRINT, {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX"})
    assert capped != numerics_fingerprint()
