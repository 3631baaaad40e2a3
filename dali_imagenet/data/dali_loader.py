"""The DALI loader: the `pipelines` graph (GPU `mixed` decoding, or the same graph on the CPU)
behind `loader.Loader`'s interface, with DALI's reader state as its `state_dict` so that a resume
mid-epoch restores the reader instead of decoding the epoch's earlier batches again.

A reader state belongs to the sample list it was taken on. If the split's sample count changed
since (`verify-shards --repair` dropped a bad sample), it cannot be restored: the epoch is then
rebuilt on the repaired shards and its first `batch` batches are decoded and dropped (a replay),
so the epoch continues at the same batch number, over the new, shorter epoch.

While `train.py` stages, the tars arrive during training (`staging.Landing`): before the pipeline
is built and before each batch, the loader waits until every tar the reader can reach has landed.
DALI reads ahead of the batches handed out: the pipeline's queue (`PREFETCH_DEPTH` batches, filled
when the iterator is built), the reader's own (`READER_PREFETCH`), the batch being made and the
shuffle buffer (`initial_fill`); one more tar is a margin. Were that model ever wrong, the reader
would meet a placeholder's zeros: a zeroed JPEG does not decode (DALI 2.4, by experiment:
"nvImageCodec failure", the sample then named) and a zeroed `.cls` parses as label -48, which the
loss refuses (seen with the gate switched off), so the run fails loudly, never trains on them."""
from __future__ import annotations

import os

import torch

from dali_imagenet.data.loader_spec import LoaderSpec
from dali_imagenet.data.partition import EpochPosition, rank_range, tars_within_reach
from dali_imagenet.data.shards import ShardError, SplitShards, find_undecodable

PREFETCH_DEPTH = 2  # batches the pipeline prepares ahead (its prefetch_queue_depth)
READER_PREFETCH = 1  # batches the webdataset reader reads ahead of the pipeline (its own prefetch_queue_depth)


def reader_reach(batches_read: int, batch_size: int, shuffle_buffer: int) -> int:
    """Samples of its share (from the start: a restored reader re-reads its shuffle buffer's, which
    can come from anywhere before the resume point) that a train reader may have read once
    `batches_read` batches were asked of it: the ones asked for, the queues ahead and the buffer."""
    return (batches_read + PREFETCH_DEPTH + READER_PREFETCH + 1) * batch_size + shuffle_buffer


class DaliLoader(EpochPosition):
    def __init__(self, spec: LoaderSpec):
        from nvidia.dali import types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from dali_imagenet.data.pipelines import imagenet_pipeline

        shards, resume, device = spec.ordered_shards(), spec.resume, spec.device
        super().__init__(shards, spec.batch_size, spec.batches, spec.train, resume)
        self.shards = shards
        restorable = resume is not None and resume.get("samples", shards.samples) == shards.samples
        self._replay = self.position if resume and not restorable else 0
        self._interrupt = spec.interrupt
        self._rank, self._world = spec.rank, spec.world_size
        self._shuffle_buffer = spec.shuffle_buffer
        self._reader_batches = self.position if restorable else 0  # where the reader stands in the epoch
        # The tars this reader can ever reach (a validation: the split, read whole); with all of them
        # landed (staging done: every later epoch), no batch waits or walks the tar list again.
        self._reachable = (tars_within_reach(shards, self._world, self._rank, self.num_samples, spec.train)
                           if spec.landing is not None and spec.train else list(shards.tars))
        self._landing = None if spec.landing is None or spec.landing.landed(self._reachable) else spec.landing
        self.build_wait_s = self._wait_for_shards()  # seconds waited for tars before the build (data wait)
        # DALI has no bfloat16 output: emit float16 and convert on the device (one cheap kernel).
        self._cast_to = torch.bfloat16 if spec.dtype == torch.bfloat16 else None
        on_gpu = device.type == "cuda"
        pipe = imagenet_pipeline(
            list(shards.tars), list(shards.indices), device="gpu" if on_gpu else "cpu", train=spec.train,
            image_size=spec.image_size, dtype=types.FLOAT if spec.dtype == torch.float32 else types.FLOAT16,
            shard_id=spec.rank, num_shards=spec.world_size, shuffle_buffer=spec.shuffle_buffer,
            crop_fraction=spec.crop_fraction, crop_min_area=spec.crop_min_area, hw_decoder_load=spec.hw_decoder_load,
            normalization=spec.normalization, interpolation=spec.interpolation, crop_mode=spec.crop_mode,
            hybrid_huffman_threshold=spec.hybrid_huffman_threshold,
            # the pipeline's own: how DALI runs it
            batch_size=spec.batch_size, num_threads=spec.threads, device_id=device.index if on_gpu else None,
            seed=spec.loader_seed, prefetch_queue_depth=PREFETCH_DEPTH, enable_checkpointing=True,
            checkpoint=resume["dali"] if restorable else None,
        )
        first, end = rank_range(shards.samples, spec.world_size, spec.rank)
        self._real_rank_samples = end - first
        try:
            self._iterator = DALIGenericIterator(
                [pipe], ["images", "labels"], reader_name="reader", auto_reset=True,
                # val: padded to full batches, the padding is cut off below
                last_batch_policy=LastBatchPolicy.DROP if spec.train else LastBatchPolicy.FILL)
        except RuntimeError as error:
            raise ShardError(_dali_message(error, shards)) from None

    def state_dict(self) -> dict:
        """Where this epoch stands: the batches handed out, DALI's reader and RNG state after them,
        and the sample count that state belongs to."""
        return {"batch": self.position, "dali": self._iterator.checkpoints()[0], "samples": self.num_samples}

    def __iter__(self):
        remaining = self._real_rank_samples - self.position * self.batch_size
        for batch in range(self._replay):  # a reader state that no longer fits the shards: read up to the stop point
            if self._interrupt is not None:
                self._interrupt(batch)
            self._next_batch()
        self._replay = 0
        while self.position < self._batches:
            batch = self._next_batch()
            self.position += 1
            images = batch["images"].permute(0, 3, 1, 2)  # NHWC memory -> NCHW view, channels_last
            labels = batch["labels"].view(-1)
            if self._cast_to is not None:
                images = images.to(self._cast_to, memory_format=torch.channels_last)
            if not self.train:  # drop the reader's padding so each image counts once
                keep = max(0, min(self.batch_size, remaining))
                remaining -= self.batch_size
                images, labels = images[:keep], labels[:keep]
            yield images, labels
        self.position = 0
        # All our batches were taken; DALI must now be at its epoch end (auto_reset then starts
        # the next epoch). A batch here would mean our count and DALI's disagree.
        try:
            next(self._iterator)
        except StopIteration:
            return
        raise RuntimeError(f"DALI's epoch is longer than the {self._batches} batches computed for it")

    def _wait_for_shards(self) -> float:
        """Waits for the tars the reader can reach before it hands out its next batch (all of a
        validation's: it is waited for once, before the build); the seconds waited."""
        if self._landing is None:
            return 0.0
        tars = self._reachable
        if self.train:
            reach = reader_reach(self._reader_batches, self.batch_size, self._shuffle_buffer)
            tars = tars_within_reach(self.shards, self._world, self._rank, reach, self.train)
        waited = self._landing.wait(tars)
        if len(tars) == len(self._reachable):
            self._landing = None  # every tar this reader can reach has landed: nothing more to wait for
        return waited

    def _next_batch(self) -> dict:
        self._wait_for_shards()
        self._reader_batches += 1
        try:
            batch = next(self._iterator)[0]
        except StopIteration:  # fewer batches on one rank would leave the others waiting
            raise RuntimeError(f"DALI's epoch is shorter than the {self._batches} batches computed for it") from None
        except RuntimeError as error:
            raise ShardError(_dali_message(error, self.shards)) from None
        self.batches_read += 1
        return batch


def _dali_message(error: Exception, shards: SplitShards) -> str:
    """DALI's errors are pages long and its decoder errors name no file: keep the line that says
    what went wrong and, for a decoder error, find the sample that does not decode."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if ".tar" in line or ".idx" in line), None)
    if cause is None:
        after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
        cause = next((line for line in lines[after:] if "pipeline object" not in line), lines[0] if lines else "")
    if "decoder" in str(error):
        culprit = find_undecodable(shards)
        cause += f"; {culprit}" if culprit else "; no undecodable sample found in the local shards within 60 s"
        cause += f"; {shards.repair_hint()}"
    return f"DALI failed reading shards under {os.path.dirname(shards.tars[0])}: {cause}"
