"""Image preprocessing for two-tower models: resize (squash or shortest edge + centre crop), then normalise.

The pipeline is split in two so that trainers can cache the expensive half:

- ``to_uint8(img)``: PIL image -> ``(H, W, 3)`` uint8 array at the model's size (decode + resize + crop);
- ``normalize(pixels)``: uint8 ``(B, 3, H, W)`` -> float ``(pixels / 255 - mean) / std``.

``ImageProcessingConfig`` is saved with every checkpoint, so indexing and serving see exactly the pixels
training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from mmstack.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESIZE_MODES = ("squash", "shortest+center-crop")


@dataclass
class ImageProcessingConfig:
    """How an image becomes model input.

    Args:
        size: output (height, width) in pixels.
        mean, std: per-channel normalisation of [0, 1] pixels.
        resize_mode: ``"squash"`` resizes to ``size`` ignoring the aspect ratio (SigLIP, and lossless for
            images already at ``size``); ``"shortest+center-crop"`` scales the shortest edge to fit and crops
            the centre (CLIP's preprocessing).
        interpolation: PIL resampling filter name (nearest, bilinear, bicubic, lanczos, box, hamming).
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize_mode: Literal["squash", "shortest+center-crop"] = "shortest+center-crop"
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bicubic"

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = tuple(int(s) for s in self.size)
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ConfigError(f"image.size must be (height, width) with positive values, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"image.mean and image.std need 3 values (RGB), got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ConfigError(f"image.std must be positive, got {self.std}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"image.resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"image.interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")

    # ---------------------------------------------------------------------------------- HF interop

    def to_hf(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` of an HF ``CLIPImageProcessor`` doing the same thing."""
        h, w = self.size
        crop = self.resize_mode != "squash"
        resample = int(INTERPOLATIONS[self.interpolation])
        size = {"shortest_edge": min(h, w)} if crop else {"height": h, "width": w}
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": size,
            "resample": resample,
            "do_center_crop": crop,
            "crop_size": {"height": h, "width": w},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], where: str = "preprocessor_config.json") -> ImageProcessingConfig:
        """Read an HF image processor config (CLIP or SigLIP style)."""
        size = cfg.get("size", 224)
        crop = bool(cfg.get("do_center_crop", False))
        out = _hw(cfg.get("crop_size") if crop else size, where)
        if crop and isinstance(size, dict) and "shortest_edge" in size and int(size["shortest_edge"]) != min(out):
            raise ConfigError(
                f"{where}: shortest_edge {size['shortest_edge']} differs from the crop size {out}; "
                "mmstack resizes the shortest edge to the crop size"
            )
        names = {int(v): k for k, v in INTERPOLATIONS.items()}
        resample = int(cfg.get("resample", 3))
        if resample not in names:
            raise ConfigError(f"{where}: unknown resample {resample}; expected one of {sorted(names)}")
        return cls(
            size=out,
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            resize_mode="shortest+center-crop" if crop else "squash",
            interpolation=names[resample],
        )


def _hw(size: Any, where: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ConfigError(f"{where}: cannot read an image size from {size!r}")


# -------------------------------------------------------------------------------------- pixels


def to_uint8(img: Image.Image, cfg: ImageProcessingConfig) -> np.ndarray:
    """Resize/crop one image as ``cfg`` says; returns ``(H, W, 3)`` uint8."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    th, tw = cfg.size
    resample = INTERPOLATIONS[cfg.interpolation]
    if img.size == (tw, th):
        pass  # already the model's size: no resampling, no blur
    elif cfg.resize_mode == "squash":
        img = img.resize((tw, th), resample)
    else:
        img = _shortest_center_crop(img, th, tw, resample)
    return np.array(img, dtype=np.uint8)  # writable, so torch.from_numpy takes it without a warning


def _shortest_center_crop(img: Image.Image, th: int, tw: int, resample: Image.Resampling) -> Image.Image:
    w, h = img.size
    scale = max(th / h, tw / w)
    # int() truncation as HF's CLIPImageProcessor, never below the crop
    nh, nw = max(th, int(h * scale)), max(tw, int(w * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return img.crop((left, top, left + tw, top + th))


def stack_uint8(arrays: list[np.ndarray]) -> torch.Tensor:
    """``(H, W, 3)`` uint8 arrays -> one ``(B, 3, H, W)`` uint8 tensor."""
    batch = np.stack(arrays)  # (B, H, W, 3)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def normalize(pixels: torch.Tensor, cfg: ImageProcessingConfig) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(pixels / 255 - mean) / std`` in one fused multiply-add."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return torch.addcmul(-mean / std, pixels.float(), 1.0 / (255.0 * std))
