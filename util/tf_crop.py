"""MAE's TF/TPU-style RandomResizedCrop (mae/util/crop.py, after BYOL), used by the linear probe.

torchvision's RandomResizedCrop tries up to ten (area, ratio) draws and falls back to a centre crop;
the TF version draws once and clips the box to the image instead, so the crop distribution differs.
"""
import math

import torch
from torchvision import transforms
from torchvision.transforms import functional as F


class RandomResizedCrop(transforms.RandomResizedCrop):
    """Same arguments as torchvision's; one draw of area and log-ratio, box clipped to the image."""

    @staticmethod
    def get_params(img, scale, ratio):
        """(top, left, height, width) of the crop, drawn from torch's default generator."""
        width, height = F.get_image_size(img)
        target_area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        crop_width = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
        crop_height = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
        top = torch.randint(0, height - crop_height + 1, size=(1,)).item()
        left = torch.randint(0, width - crop_width + 1, size=(1,)).item()
        return top, left, crop_height, crop_width
