"""Images on the wire: generated frames out as JPEG, reference images in as base64 PNG/JPEG.

Frames leave the server as one JPEG per WebSocket message: a browser shows a JPEG blob without any
decoder of ours, and a tiny frame stays a few hundred bytes. Reference images arrive base64-encoded
in the session's JSON body and must already have the video's size: resizing would hand the model a
picture the person did not choose.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch

JPEG_QUALITY = 90  # near-lossless for the eye at a fraction of PNG's size; tests encode with the same value


class ImageError(ValueError):
    """A reference image that cannot be used; the message names what is wrong, not the field."""


def encode_jpeg(frame: torch.Tensor | np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of one uint8 frame [H, W, 3]."""
    from PIL import Image

    array = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    out = io.BytesIO()
    # 4:4:4 keeps full chroma: the synthetic world's sprites are a few pixels wide
    Image.fromarray(np.ascontiguousarray(array), "RGB").save(out, format="JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def encode_jpegs(frames: torch.Tensor) -> list[bytes]:
    """JPEG bytes of each uint8 frame of [F, H, W, 3]."""
    return [encode_jpeg(frame) for frame in frames]


def decode_image(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] of PNG or JPEG bytes (any mode converted to RGB); ImageError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("PNG", "JPEG"):
                raise ImageError(f"is a {image.format} image; send PNG or JPEG")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"is not a readable PNG or JPEG image ({type(e).__name__})") from None


def decode_reference(text: str, height: int, width: int) -> torch.Tensor:
    """uint8 [height, width, 3] of a base64 PNG/JPEG (a `data:image/...;base64,` prefix is allowed)."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("is not valid base64") from None
    image = decode_image(data)
    if image.shape[:2] != (height, width):
        raise ImageError(f"is {image.shape[1]}x{image.shape[0]} (width x height); the video is {width}x{height}")
    return torch.from_numpy(image.copy())
