"""What the image teachers share: the CIFAR-10 constants and the server-side preprocessing.

Images travel as raw uint8 pixels ([N, H, W, 3], RGB, HWC: the proto's IMAGE input
kind), and each teacher turns them into the floats its network wants. Doing it on the
server keeps one contract for every vision teacher whatever its resolution or
normalisation (a 224-pixel pretrained ViT and a 32-pixel CIFAR ViT take the same
request) and sends 4x fewer bytes than float pixels would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .spec import IMAGE, InputSpec

IMAGE_INPUT = "image"

# The standard CIFAR-10 label order (label j is CIFAR10_CLASSES[j]), as in the original batches.meta.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SIZE = 32
# Per-channel mean and std of the CIFAR-10 training images (pixels in [0, 1]), the usual values.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def image_input_spec(size: int = CIFAR10_SIZE) -> InputSpec:
    """The raw image input of a vision teacher: uint8 [size, size, 3] per row (RGB, HWC)."""
    return InputSpec(
        IMAGE_INPUT, IMAGE, "uint8", (size, size, 3),
        description=f"RGB image, uint8 [{size}, {size}, 3] (HWC); the server scales, resizes and normalises it",
    )


def to_pixels(
    images: torch.Tensor,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, size, size] on ``device``.

    Scale to [0, 1], resize bilinearly when the network's resolution differs from the
    input's (e.g. CIFAR's 32 px into a 224 px pretrained model), then normalise per channel.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    x = images.to(device).permute(0, 3, 1, 2).to(dtype) / 255.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean_t = torch.tensor(mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
