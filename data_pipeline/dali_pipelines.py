"""DALI pipeline definitions mirroring ``transforms.py`` (the torch backend), and their iterator wrapper.

One pipeline = one fixed, ordered list of files. Which files, in which order, for which rank, is decided in
``dali_backend.py`` (the same index sequence the torch backend draws); this module only turns a list into batches.

Augmentation, in the order torchvision applies it (train_transform):
  resize S x S (linear, antialiased -- the tent filter PIL/torchvision use for BILINEAR+antialias)
  -> rotation uniform in +-rotate_deg (linear, canvas kept, fill 0)
  -> brightness factor b ~ U[1-β, 1+β]: x*b, clamped            (torchvision ColorJitter brightness)
  -> contrast factor c ~ U[1-γ, 1+γ]: c*x + (1-c)*mean_grey(x)  (ColorJitter contrast: centre = the image's own
     mean grey level, not mid-grey -- fundus photos are mostly black border, mean ~60, so this matters)
  -> horizontal flip p=0.5 (folded into crop_mirror_normalize; flipping last is equivalent because the rotation
     distribution is symmetric and brightness/contrast are flip-invariant)
  -> ImageNet normalisation (mean/std x 255).
torchvision picks brightness/contrast order at random; they commute up to clamping. fn.brightness_contrast is not
used because its contrast centre must be a CPU argument, and the per-image mean lives on the GPU in mixed mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .records import DataError
from .streams import IMAGENET_MEAN, IMAGENET_STD

# PIL "L" conversion weights (ITU-R 601-2), used by torchvision's adjust_contrast for the mean grey level.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
READER_NAME = "Reader"
PREFETCH_BATCHES = 2  # DALI's default prefetch_queue_depth: a decode error can surface this many batches early


@dataclass(frozen=True)
class AugmentSpec:
    hflip: bool = True
    rotate_deg: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1

    @classmethod
    def from_data_cfg(cls, data_cfg) -> "AugmentSpec":
        return cls(hflip=bool(data_cfg.hflip), rotate_deg=float(data_cfg.rotate_deg),
                   brightness=float(data_cfg.brightness), contrast=float(data_cfg.contrast))


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that shapes a pipeline except its file list."""
    image_size: int
    batch_size: int
    num_threads: int
    device_id: int | None       # None = DALI CPU mode (decode + augment on the CPU threads)
    augment: AugmentSpec | None  # None = eval: resize + normalise only

    @property
    def gpu(self) -> bool:
        return self.device_id is not None


def _augment(images, aug: AugmentSpec, gpu: bool):
    """Rotation + brightness/contrast (uint8 HWC in, float HWC in [0, 255] or uint8 out) and the mirror flag."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    def per_sample(node):  # random draws are CPU nodes; arithmetic with a GPU image needs them on the GPU
        return node.gpu() if gpu else node

    if aug.rotate_deg > 0:
        angle = fn.random.uniform(range=(-aug.rotate_deg, aug.rotate_deg))
        images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
    if aug.brightness > 0 or aug.contrast > 0:
        x = fn.cast(images, dtype=types.FLOAT)
        if aug.brightness > 0:
            b = fn.random.uniform(range=(max(0.0, 1.0 - aug.brightness), 1.0 + aug.brightness))
            x = dmath.clamp(x * per_sample(b), 0.0, 255.0)
        if aug.contrast > 0:
            c = per_sample(fn.random.uniform(range=(max(0.0, 1.0 - aug.contrast), 1.0 + aug.contrast)))
            channel_mean = fn.reductions.mean(x, axes=[0, 1])
            grey_mean = sum(w * channel_mean[k] for k, w in enumerate(GREY_WEIGHTS))
            x = dmath.clamp(c * x + (1.0 - c) * grey_mean, 0.0, 255.0)
        images = x
    mirror = fn.random.coin_flip(probability=0.5) if aug.hflip else 0
    return images, mirror


def build_pipeline(spec: PipelineSpec, files: Sequence[str], positions: Sequence[int], *, seed: int,
                   pad_last_batch: bool):
    """A built DALI pipeline yielding (images, positions): images normalised float, CHW on the CPU, HWC on the GPU
    (the caller permutes HWC to an N x 3 x H x W channels_last view for free); positions = index into ``files``."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def _pipe():
        jpegs, pos = fn.readers.file(files=list(files), labels=[int(p) for p in positions], random_shuffle=False,
                                     pad_last_batch=pad_last_batch, name=READER_NAME)
        images = fn.decoders.image(jpegs, device="mixed" if spec.gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = 0
        if spec.augment is not None:
            images, mirror = _augment(images, spec.augment, spec.gpu)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="HWC" if spec.gpu else "CHW", mirror=mirror,
            mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])
        return images, (pos.gpu() if spec.gpu else pos)

    pipe = _pipe(batch_size=spec.batch_size, num_threads=max(1, spec.num_threads), device_id=spec.device_id,
                 seed=seed % (2**31 - 1))
    pipe.build()
    return pipe


def derive_seed(*parts: int) -> int:
    """A DALI pipeline seed from (base seed, stream tag, epoch, rank, ...): distinct streams never share draws."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) % (2**31 - 1)


class ListRun:
    """One pass over a fixed list: a pipeline + DALIGenericIterator yielding (images, positions) tensors.

    ``len()`` batches, the last one partial when the list is not a multiple of the batch size (the reader pads
    it with ``pad_last_batch`` and the iterator trims the padding again: LastBatchPolicy.PARTIAL).
    ``rewind()`` starts the same list again (eval passes); a pass left unfinished is restarted by rebuilding,
    because DALI ignores a reset before the end of its epoch.
    """

    def __init__(self, spec: PipelineSpec, files: Sequence[str], *, seed: int, what: str):
        if not files:
            raise ValueError(f"{what}: empty file list")
        self.spec, self.files, self.seed, self.what = spec, list(files), seed, what
        self._len = -(-len(self.files) // spec.batch_size)
        self._iter = None
        self._done = 0          # batches taken in the current pass
        self._build()

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        self._iter = None  # drop the old pipeline (and its threads / buffers) before making a new one
        partial = len(self.files) % self.spec.batch_size != 0
        try:
            pipe = build_pipeline(self.spec, self.files, range(len(self.files)), seed=self.seed,
                                  pad_last_batch=partial)
            self._iter = DALIGenericIterator([pipe], ["images", "pos"], reader_name=READER_NAME,
                                             last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as e:  # the iterator decodes the first batch while being built
            self._done = 0
            raise self._explain(e) from None
        self._done = 0

    def __len__(self) -> int:
        return self._len

    def rewind(self) -> None:
        if self._done == 0:
            return
        if self._done == self._len:
            self._iter.reset()
            self._done = 0
        else:
            self._build()

    def _explain(self, err: Exception) -> Exception:
        """Name the bad file(s) near the failing batch (DALI prefetches, so look a few batches ahead)."""
        from PIL import Image

        bs = self.spec.batch_size
        window = self.files[self._done * bs:(self._done + PREFETCH_BATCHES + 2) * bs]
        bad = []
        for path in dict.fromkeys(window):
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 -- any failure to decode is what we are looking for
                bad.append(f"{path} ({type(e).__name__}: {e})")
        if bad:
            return DataError(f"{self.what}: unreadable image(s): {'; '.join(bad)}. Run `metaloss prepare` on the "
                             f"raw data set: it quarantines such files.")
        return RuntimeError(f"{self.what}: DALI pipeline error: {err}")

    def __iter__(self):
        self.rewind()
        while self._done < self._len:
            try:
                out = next(self._iter)[0]
            except StopIteration:  # cannot happen when len() is right; fail loudly rather than yield short epochs
                raise RuntimeError(f"{self.what}: DALI stopped after {self._done} of {self._len} batches") from None
            except RuntimeError as e:  # a missing / corrupt file; DALI's message does not always name it
                raise self._explain(e) from None
            self._done += 1
            images = out["images"]
            if self.spec.gpu:
                images = images.permute(0, 3, 1, 2)  # N x H x W x C memory = channels_last N x C x H x W view
            yield images, out["pos"].reshape(-1).to(torch.int64)
