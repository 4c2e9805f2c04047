"""The 2D U-Net, its training targets per label mode, and reading a trained model back.

Shapes (torch, channels first):

* input ``x``: (n, in_channels, h, w) float32 in [0, 1] (HU window applied, see
  :func:`noduleflow.intensity.normalize_hu`), ``in_channels = 2 * context + 1`` neighbouring axial
  slices; ``h`` and ``w`` must be divisible by ``2 ** depth``;
* output: (n, out_channels, h, w) logits; ``out_channels`` is 1 (``positive`` or ``complementary``
  label mode) or 2 (``hybrid``: channel 0 positive, channel 1 complementary).

Label modes (the seed article's three, Chiu, Tsai & Su 2021):

* ``positive``: the target is the nodule mask;
* ``complementary``: the target is "inside the region the model sees (``roi``) and not nodule",
  i.e. exactly ``1 - positive`` inside the ROI and 0 outside it. Training ignores pixels outside
  the ROI (their loss weight is 0, see :mod:`noduleflow.losses`), so the output there is not
  defined; inference zeroes the probability outside the lung when ``lung_roi`` is true, and with
  ``lung_roi`` false the ROI is the whole patch;
* ``hybrid``: both targets as two channels, trained jointly.

The nodule probability of a model is :func:`nodule_probability` of its logits: the sigmoid of the
positive channel, or one minus the sigmoid of the complementary channel.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LABEL_MODES = ("positive", "complementary", "hybrid")
NORMS = ("batch", "instance", "none")


def out_channels_for(label_mode: str) -> int:
    """Logit channels a model trained with ``label_mode`` has (2 for hybrid, else 1)."""
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode {label_mode!r} is not one of {', '.join(LABEL_MODES)}")
    return 2 if label_mode == "hybrid" else 1


def memory_format_for(norm: str) -> torch.memory_format:
    """The faster memory format for a U-Net with ``norm`` (measured on CPU, benchmarks/train.py):
    channels_last (oneDNN's NHWC convolutions) except with instance norm, whose kernels prefer NCHW."""
    return torch.contiguous_format if norm == "instance" else torch.channels_last


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> ReLU) layers, optional 2-D dropout at the end; keeps h and w.

    The convolutions have no bias when a norm follows (the norm's shift replaces it)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", dropout: float = 0.0):
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias), _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias), _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class UpBlock(nn.Module):
    """2x2 transposed conv (stride 2) halving the channels, concatenation with the skip, ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet2d(nn.Module):
    """A plain 2D U-Net.

    ``depth`` poolings; level ``i`` (0..depth) has ``base_filters * 2**i`` channels, so
    ``depth=3, base_filters=16`` gives 16-32-64-128 (bottleneck 128 at h/8 x w/8). Encoder: a
    :class:`ConvBlock` per level, 2x2 max pooling between levels. Decoder: :class:`UpBlock` per
    level (transposed conv, skip concatenation, ConvBlock). Head: 1x1 conv to ``out_channels``
    logits. Input (n, in_channels, h, w) with h, w divisible by ``2**depth``; output
    (n, out_channels, h, w). ``dropout`` (2-D, per channel) is applied after the bottleneck and
    each decoder block.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, depth: int = 3, base_filters: int = 16,
                 norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
        if depth < 1 or base_filters < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels, out_channels, depth and base_filters must be >= 1")
        self.depth = int(depth)
        widths = [base_filters * 2 ** i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for i, width in enumerate(widths):
            self.encoders.append(ConvBlock(previous, width, norm, dropout if i == depth else 0.0))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.decoders = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], norm, dropout) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** self.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by 2**depth = {multiple}")
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for decoder, skip in zip(self.decoders, reversed(skips)):
            x = decoder(x, skip)
        return self.head(x)


def build_targets(mask: Any, roi: Any, label_mode: str) -> torch.Tensor:
    """Training targets (n, C, h, w) float32 from a nodule ``mask`` and a ``roi`` (both (n, h, w), 0/1).

    ``positive``: C=1, the mask. ``complementary``: C=1, ``roi & ~mask`` (exactly 1 - positive
    inside the ROI, 0 outside). ``hybrid``: C=2, [positive, complementary].
    """
    mask_t = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask) > 0
    roi_t = torch.as_tensor(np.asarray(roi) if not torch.is_tensor(roi) else roi) > 0
    if mask_t.shape != roi_t.shape or mask_t.ndim != 3:
        raise ValueError(f"mask {tuple(mask_t.shape)} and roi {tuple(roi_t.shape)} must both be (n, h, w)")
    positive = mask_t.float()
    complementary = (roi_t & ~mask_t).float()
    channels = {"positive": [positive], "complementary": [complementary],
                "hybrid": [positive, complementary]}
    if label_mode not in channels:
        raise ValueError(f"label_mode {label_mode!r} is not one of {', '.join(LABEL_MODES)}")
    return torch.stack(channels[label_mode], dim=1)


def nodule_probability(logits: torch.Tensor, label_mode: str, hybrid_output: str = "positive") -> torch.Tensor:
    """Nodule probability (n, h, w) from logits (n, out_channels, h, w).

    ``positive``: sigmoid of channel 0; ``complementary``: 1 - sigmoid of channel 0; ``hybrid``:
    sigmoid of channel 0 (``hybrid_output="positive"``) or 1 - sigmoid of channel 1
    (``"negative"``, also accepted as ``"complementary"``).
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (n, channels, h, w), got {tuple(logits.shape)}")
    logits = logits.float()
    if label_mode == "positive":
        return torch.sigmoid(logits[:, 0])
    if label_mode == "complementary":
        return 1.0 - torch.sigmoid(logits[:, 0])
    if label_mode == "hybrid":
        if logits.shape[1] < 2:
            raise ValueError("a hybrid model has two output channels")
        if hybrid_output == "positive":
            return torch.sigmoid(logits[:, 0])
        if hybrid_output in ("negative", "complementary"):
            return 1.0 - torch.sigmoid(logits[:, 1])
        raise ValueError(f"hybrid_output {hybrid_output!r} is not positive or negative")
    raise ValueError(f"label_mode {label_mode!r} is not one of {', '.join(LABEL_MODES)}")


def load_model(path: str | Path, device: str = "cpu") -> tuple[UNet2d, dict]:
    """Read a ``model.pt`` written by :func:`noduleflow.train.train_fold`.

    Returns (the U-Net with its weights, on ``device``, in eval mode; the metadata dict: every key
    of the file except ``state_dict``, e.g. ``model``, ``label_mode``, ``intensity``, ``context``,
    ``patch_size``, ``lung_roi``, ``fold``, ``heldout_patch_dice``). Raises InputError naming the
    file when it is missing or not a model file.
    """
    from noduleflow.io import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad input file
        raise InputError(f"{path}: cannot read model file: {exc}") from exc
    if not isinstance(saved, dict) or "state_dict" not in saved or "model" not in saved:
        raise InputError(f"{path}: not a noduleflow model file (needs 'state_dict' and 'model')")
    model = UNet2d(**saved["model"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the stored architecture: {exc}") from exc
    meta = {key: value for key, value in saved.items() if key != "state_dict"}
    return model.to(device).eval(), meta


#: what a device setting may say (``train.device``, ``predict.device``, ``noduleflow predict --device``)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def select_device(device: str = "auto", setting: str = "device", auto_mps: bool = True) -> torch.device:
    """The torch device a device setting names, checked to exist: the one implementation behind
    ``train.device``, ``predict.device`` and ``noduleflow predict --device``.

    ``auto``: cuda when available, else mps when ``auto_mps`` and available, else cpu; ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``: that device. Anything else, or a device this machine does not
    have, raises InputError naming ``setting`` (e.g. ``config predict.device`` or ``--device``)."""
    from noduleflow.io import InputError

    name = str(device)
    if not _DEVICE_RE.fullmatch(name):
        raise InputError(f"{setting}: {device!r} is not a device; use {DEVICE_CHOICES}")
    mps = getattr(torch.backends, "mps", None)
    mps_available = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if auto_mps and mps_available else "cpu")
    parsed = torch.device(name)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(f"{setting}: {name} requested but no CUDA device is available "
                             f"(torch {torch.__version__}, {build})")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"{setting}: {name} requested but only {count} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{count - 1})")
    if parsed.type == "mps" and not mps_available:
        raise InputError(f"{setting}: mps requested but MPS is not available")
    return parsed


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The mixed-precision type of a training step or an inference pass, or None for float32: float16
    (training adds a gradient scaler) on cuda; bfloat16 on a CPU with native bfloat16 arithmetic
    (AVX512-BF16 or AMX: about twice the float32 speed there); float32 elsewhere (mps, CPUs without
    it) or when ``amp`` is off. Weights, the loss and validation stay float32."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else None
    return None
