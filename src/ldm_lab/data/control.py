"""Control images computed from a target image (ControlNet preprocessors)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV Canny edges of ``image`` as a 3-channel image."""
    gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return Image.fromarray(cv2.Canny(gray, low, high)).convert("RGB")
