"""torchvision transforms for the torch backend (the DALI pipelines mirror these; see dali_backend.py).

Train (the paper): resize to S x S, random horizontal flip, rotation within +-rotate_deg, brightness and contrast
within +-10%, ImageNet normalisation. Eval: resize to S x S + normalisation only.
Resize comes first so the per-image augmentation runs on S x S pixels, not on the 512 px prepared originals.
"""
from __future__ import annotations

from torchvision import transforms as T

from common.normalization import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose([
        T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(image_size: int, *, hflip: bool = True, rotate_deg: float = 10.0,
                    brightness: float = 0.1, contrast: float = 0.1) -> T.Compose:
    steps = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if rotate_deg > 0:
        steps.append(T.RandomRotation(rotate_deg, interpolation=T.InterpolationMode.BILINEAR))
    if brightness > 0 or contrast > 0:
        steps.append(T.ColorJitter(brightness=brightness, contrast=contrast))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def augment_kwargs(data_cfg) -> dict:
    return dict(hflip=data_cfg.hflip, rotate_deg=data_cfg.rotate_deg,
                brightness=data_cfg.brightness, contrast=data_cfg.contrast)
