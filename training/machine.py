"""The machine a model was trained or measured on, as far as it decides the numbers.

Recorded in each run's ``provenance.json`` and by the benchmarks: the same code, data and seed
train bit for bit alike on machines whose arithmetic agrees (:func:`numerics_fingerprint`), and may
part from the first epoch on where it does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
from pathlib import Path

__all__ = ["VECTOR_FLAGS", "cpu_model", "cpu_vector_flags", "numerics", "numerics_fingerprint"]

#: The vector extensions that decide which kernels TensorFlow's CPU code runs (and so how it rounds).
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of /proc/cpuinfo, None where it is missing or cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_vector_flags() -> list[str]:
    """Which of :data:`VECTOR_FLAGS` /proc/cpuinfo lists (empty where it cannot be read)."""
    present = set((_cpuinfo("flags") or "").split())
    return [flag for flag in VECTOR_FLAGS if flag in present]


def numerics_fingerprint() -> str:
    """A hash of what TensorFlow computes for a fixed small network on a fixed input.

    Training is deterministic on one machine, but two machines whose CPUs take other kernel
    paths (AVX2 against AVX-512, another oneDNN build) round differently, and a training run then
    parts from the first epoch on. Equal fingerprints say two machines compute these operations
    (convolution, depthwise convolution, matrix product, reductions: those of the
    classifier) bit for bit alike; different ones say results of the same code and seed may differ.
    """
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((4, 32, 32, 3)), tf.float32)
    conv = tf.constant(rng.standard_normal((3, 3, 3, 16)) * 0.2, tf.float32)
    depthwise = tf.constant(rng.standard_normal((3, 3, 16, 1)) * 0.2, tf.float32)
    dense = tf.constant(rng.standard_normal((16, 8)) * 0.2, tf.float32)
    y = tf.nn.relu6(tf.nn.conv2d(x, conv, strides=2, padding="SAME"))
    y = tf.nn.relu6(tf.nn.depthwise_conv2d(y, depthwise, strides=[1, 1, 1, 1], padding="SAME"))
    y = tf.matmul(tf.reduce_mean(y, axis=[1, 2]), dense)
    return hashlib.sha256(y.numpy().tobytes()).hexdigest()[:16]


def numerics() -> dict:
    """What a run's provenance records about the machine's arithmetic."""
    import tensorflow as tf

    return {
        "cpu": cpu_model(),
        "cpu_vector_flags": cpu_vector_flags(),
        "tensorflow": tf.__version__,
        "numerics_fingerprint": numerics_fingerprint(),
    }
