"""torchvision transforms for the torch backend (the DALI pipelines mirror these; see dali/pipelines.py).

Train (the paper): resize to S x S, random horizontal flip, rotation within +-rotate_deg, brightness and contrast
within +-10%, ImageNet normalisation. Eval: resize to S x S + normalisation only.
Resize comes first so the per-image augmentation runs on S x S pixels, not on the 512 px prepared originals.
"""
from __future__ import annotations

from torchvision import transforms as T

from common.normalization import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.settings import AugmentSpec


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose([
        T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(image_size: int, augment: AugmentSpec = AugmentSpec()) -> T.Compose:
    steps = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if augment.hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment.rotate_deg > 0:
        steps.append(T.RandomRotation(augment.rotate_deg, interpolation=T.InterpolationMode.BILINEAR))
    if augment.brightness > 0 or augment.contrast > 0:
        steps.append(T.ColorJitter(brightness=augment.brightness, contrast=augment.contrast))
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
