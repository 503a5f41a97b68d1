"""DALI pipeline definitions mirroring ``transforms.py`` (the torch backend), and their two iterator wrappers.

``ListRun``: one pipeline = one fixed, ordered list of files, read once per pass (``data.dali_sharding=explicit``
and the eval streams; which files, in which order, for which rank, is decided in ``streams.py``).
``ReaderRun``: one pipeline over a whole split whose reader shards and shuffles by itself, built once and read for
ever (``data.dali_sharding=reader``, the default). Both yield (images, positions); the reader's "label" is a position
that ``streams.py`` maps to the split id and class label.

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

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from data_pipeline.records import DataError
from data_pipeline.settings import AugmentSpec  # noqa: F401 -- re-exported: the pipelines' augmentation spec
from common.normalization import IMAGENET_MEAN, IMAGENET_STD

# PIL "L" conversion weights (ITU-R 601-2), used by torchvision's adjust_contrast for the mean grey level.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
READER_NAME = "Reader"
PREFETCH_BATCHES = 2  # DALI's default prefetch_queue_depth: a decode error can surface this many batches early
# ReaderRun's shuffle buffer (fn.readers.file initial_fill; DALI's default is 1024), in samples. DALI's random_shuffle
# is a BUFFER shuffle: the reader walks its shard in a fixed order (the file list after one global shuffle with a
# hard-coded seed, identical on every rank so the shards stay disjoint) and each output is drawn uniformly from the
# next `initial_fill` samples of the current pass (DALI 2.4 never mixes two passes in one draw). A shard no
# larger than the buffer therefore gets a fresh uniform permutation every pass; a larger shard gets that fixed order
# jittered by about the buffer size. The buffer holds encoded files (~50-150 KB for a prepared 512 px JPEG): 4096
# of them are ~0.4 GB per pipeline, read once before the first batch of the run.
SHUFFLE_BUFFER = 4096


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that shapes a pipeline except its file list."""
    image_size: int
    batch_size: int
    num_threads: int
    device_id: int | None       # None = DALI CPU mode (decode + augment on the CPU threads)
    augment: AugmentSpec | None  # None = eval: resize + normalise only
    # share of the JPEG decoding on the A100/H100/H200 hardware decoder ("mixed" only; DALI's default is 0.90)
    hw_decoder_load: float = 0.90
    dont_use_mmap: bool = False  # plain reads instead of mmap (network file systems)

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
                   reader_args: dict):
    """A built DALI pipeline yielding (images, positions): images normalised float, CHW on the CPU, HWC on the GPU
    (the caller permutes HWC to an N x 3 x H x W channels_last view for free); positions = the reader's labels.
    ``reader_args``: fn.readers.file's sharding / shuffling / padding arguments."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def _pipe():
        jpegs, pos = fn.readers.file(files=list(files), labels=[int(p) for p in positions], name=READER_NAME,
                                     dont_use_mmap=spec.dont_use_mmap, **reader_args)
        gpu_decode = dict(hw_decoder_load=spec.hw_decoder_load) if spec.gpu else {}
        images = fn.decoders.image(jpegs, device="mixed" if spec.gpu else "cpu", output_type=types.RGB,
                                   **gpu_decode)
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


def shard_sizes(n: int, world: int) -> list[int]:
    """Sizes of fn.readers.file's shards: shard i is [floor(i*n/w), floor((i+1)*n/w)) of its (shuffled) list."""
    return [(i + 1) * n // world - i * n // world for i in range(world)]


def _as_torch(out: dict, gpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = out["images"]
    if gpu:
        images = images.permute(0, 3, 1, 2)  # N x H x W x C memory = channels_last N x C x H x W view
    return images, out["pos"].reshape(-1).to(torch.int64)


def _unreadable(paths: Sequence[str]) -> list[str]:
    """``path (reason)`` for every file PIL cannot fully decode (threads: PIL's decoders release the GIL)."""
    from PIL import Image

    def check(path: str) -> str | None:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 -- any failure to decode is what we are looking for
            return f"{path} ({type(e).__name__}: {e})"
        return None

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return [bad for bad in pool.map(check, paths) if bad]


def explain_failure(err: Exception, what: str, files: Sequence[str], suspects: Sequence[str] | None) -> Exception:
    """A DataError naming the bad file(s) behind a DALI pipeline error, else a RuntimeError carrying DALI's message.

    Checked with PIL: the files DALI's message names (its decoder says "Failed to decode sample #k : <path>"),
    then ``suspects`` (ListRun: the files around the failing batch), or -- when None and DALI named no file of
    ``files`` (a ReaderRun does not know which files its shuffled shard was on) -- every file of the list."""
    msg = str(err)
    unique = list(dict.fromkeys(files))
    named = [f for f in unique if f in msg]
    if suspects is None:
        suspects = [] if named else unique
    bad = _unreadable(list(dict.fromkeys([*named, *suspects])))
    hint = "Run `metaloss prepare` on the raw data set: it quarantines such files."
    if bad:
        return DataError(f"{what}: unreadable image(s): {'; '.join(bad)}. {hint}")
    if named:  # PIL reads it but DALI's decoder does not (e.g. a JPEG flavour nvJPEG refuses): quote DALI
        lines = [ln.strip() for ln in msg.splitlines() if any(f in ln for f in named)]
        return DataError(f"{what}: DALI cannot decode {', '.join(named)} ({lines[0] if lines else 'no detail'}). "
                         f"{hint}")
    return RuntimeError(f"{what}: DALI pipeline error: {err}")


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
                                  reader_args=dict(random_shuffle=False, pad_last_batch=partial))
            self._iter = DALIGenericIterator([pipe], ["images", "pos"], reader_name=READER_NAME,
                                             last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as e:  # the iterator decodes the first batch while being built
            self._done, self._iter = 0, None
            raise self._explain(e) from None
        self._done = 0

    def __len__(self) -> int:
        return self._len

    def rewind(self) -> None:
        if self._iter is None:  # the last build or batch failed: DALI pipelines do not recover from errors
            self._build()
            return
        if self._done == 0:
            return
        if self._done == self._len:
            self._iter.reset()
            self._done = 0
        else:
            self._build()

    def _explain(self, err: Exception) -> Exception:
        """Name the bad file(s) near the failing batch (DALI prefetches, so look a few batches ahead)."""
        bs = self.spec.batch_size
        window = self.files[self._done * bs:(self._done + PREFETCH_BATCHES + 2) * bs]
        return explain_failure(err, self.what, self.files, window)

    def __iter__(self):
        self.rewind()
        while self._done < self._len:
            try:
                out = next(self._iter)[0]
            except StopIteration:  # cannot happen when len() is right; fail loudly rather than yield short epochs
                raise RuntimeError(f"{self.what}: DALI stopped after {self._done} of {self._len} batches") from None
            except RuntimeError as e:  # a missing / corrupt file; DALI's message does not always name it
                self._iter = None
                raise self._explain(e) from None
            self._done += 1
            yield _as_torch(out, self.spec.gpu)


class ReaderRun:
    """One pipeline over a whole split that DALI's reader shards and shuffles: built once, read for ever.

    fn.readers.file(shard_id, num_shards, random_shuffle=True, stick_to_shard=True, initial_fill=buffer): this rank
    reads shard ``shard_id`` of the list (see ``shard_sizes``) pass after pass, each pass re-shuffled (see
    SHUFFLE_BUFFER for what DALI's shuffle is). stick_to_shard: each rank keeps its shard, so it re-reads the same
    files every pass (page-cache and node-local-disk friendly; DALI's recommendation for multi-node jobs); the global
    batch is one batch from every shard either way, so moving ranks across shards would not change what the
    model sees.

    ``next()`` never raises StopIteration: at the end of a pass the iterator is reset (auto_reset) and reading goes on.
    pad_last_batch=True: every pass ends on a batch boundary -- DALI pads each shard (repeating its last sample) to
    the largest shard's size and then to a whole batch, so a pass is ``pass_batches`` = ceil(ceil(n/w)/bs) batches on
    every rank and the caller can count where passes begin. pad_last_batch=False: passes follow each other with no
    padding, and the batch at a pass boundary holds the end of one pass and the start of the next.
    """

    def __init__(self, spec: PipelineSpec, files: Sequence[str], positions: Sequence[int], *, shard_id: int,
                 num_shards: int, seed: int, pad_last_batch: bool, what: str):
        if len(files) < num_shards:
            raise ValueError(f"{what}: {len(files)} files for {num_shards} shards")
        self.spec, self.files, self.positions = spec, list(files), list(positions)
        self.shard_id, self.num_shards, self.seed, self.what = shard_id, num_shards, seed, what
        self.pad_last_batch = pad_last_batch
        largest = -(-len(self.files) // num_shards)
        self.pass_batches = -(-largest // spec.batch_size) if pad_last_batch else None
        self.buffer = max(1, min(largest, SHUFFLE_BUFFER))
        self._iter = None
        self._build()

    @property
    def broken(self) -> bool:
        """A DALI pipeline does not recover from an error: the owner builds a new one."""
        return self._iter is None

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        reader_args = dict(shard_id=self.shard_id, num_shards=self.num_shards, random_shuffle=True,
                           stick_to_shard=True, initial_fill=self.buffer, pad_last_batch=self.pad_last_batch)
        try:
            pipe = build_pipeline(self.spec, self.files, self.positions, seed=self.seed, reader_args=reader_args)
            # FILL: every batch full, padding included (the caller drops it by counting) and no pipeline output
            # ever skipped, so the batches are the reader's stream as is; padded, the iterator's epoch is exactly
            # one pass. Not DROP: it stops every rank at the smallest shard's floor(m/bs) batches (what we want),
            # but when bs divides m and the shards are uneven it leaves the pass's last batch in the pipeline and
            # the next epoch starts with it (measured, DALI 2.4: n=21, 2 shards, bs=5 -> epoch 2 opens with a
            # batch of 5 copies of one padding sample).
            it = DALIGenericIterator([pipe], ["images", "pos"], reader_name=READER_NAME, auto_reset=True,
                                     last_batch_policy=LastBatchPolicy.FILL)
        except RuntimeError as e:  # the iterator decodes the first batch while being built
            raise explain_failure(e, self.what, self.files, None) from None
        if self.pad_last_batch and len(it) != self.pass_batches:
            raise RuntimeError(f"{self.what}: DALI reports {len(it)} batches per pass, expected "
                               f"{self.pass_batches}; this DALI version pads shards differently")
        self._iter = it

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (images, positions); a new pass starts seamlessly after the last one."""
        if self._iter is None:
            raise RuntimeError(f"{self.what}: the pipeline failed before; build a new one")
        for attempt in (0, 1):
            try:
                return _as_torch(next(self._iter)[0], self.spec.gpu)
            except StopIteration:  # end of a pass: auto_reset has already rewound the iterator
                if attempt:
                    raise RuntimeError(f"{self.what}: DALI yielded nothing after a reset") from None
            except RuntimeError as e:  # a missing / corrupt file
                self._iter = None
                raise explain_failure(e, self.what, self.files, None) from None
        raise AssertionError("unreachable")
