"""What a run's final validation predicted, sample by sample: `RUN/predictions.npz`, which the
run's page reads for its per-class table, its confusions and its example images.

One row per val sample, in the shards' reading order: its key, its label, the top-5 classes and
their probabilities, from the weights that scored best at that validation (raw or EMA). ImageNet's
50,000 val images make ~1 MB (keys as fixed-width text, classes as int16, probabilities as float16).
Read back with `allow_pickle=False`: a file fetched from S3 must not be able to run code.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_imagenet.atomic import write_atomic
from dali_imagenet.errors import DaliImagenetError


class PredictionsError(DaliImagenetError):
    """A predictions file that cannot be read; the message names it."""


@dataclass
class Predictions:
    keys: np.ndarray  # str, one per val sample
    labels: np.ndarray  # int, the true class
    top5: np.ndarray  # int [N, 5], best first
    probabilities: np.ndarray  # float [N, 5]
    weights: str  # "raw" or "ema": which weights predicted
    epoch: int  # the validation's (1-based)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def correct(self) -> np.ndarray:
        return self.top5[:, 0] == self.labels

    def save(self, path: str | Path) -> Path:
        """Written atomically (`atomic.write_atomic`): a reader sees the old file or the new one."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, keys=self.keys.astype(str), labels=self.labels.astype(np.int32),
                            top5=self.top5.astype(np.int16 if self.top5.max(initial=0) < 2**15 else np.int32),
                            probabilities=self.probabilities.astype(np.float16), weights=np.array(self.weights),
                            epoch=np.array(self.epoch))
        return write_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Predictions:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["keys"], data["labels"].astype(np.int64), data["top5"].astype(np.int64),
                           data["probabilities"].astype(np.float32), str(data["weights"]), int(data["epoch"]))
        except (OSError, ValueError, KeyError) as error:
            raise PredictionsError(f"{path}: not a predictions file ({error})") from None

    def per_class(self, num_classes: int) -> list[dict]:
        """Every class: its val images, how many the top-1 got right, and its top-1 accuracy (%)."""
        counts = np.bincount(self.labels, minlength=num_classes)
        right = np.bincount(self.labels[self.correct], minlength=num_classes)
        return [{"index": c, "images": int(counts[c]), "correct": int(right[c]),
                 "top1": 100.0 * right[c] / counts[c] if counts[c] else None} for c in range(num_classes)]

    def confusions(self, top: int = 20) -> list[dict]:
        """The most frequent (true class, predicted class) pairs among the wrong top-1s."""
        wrong = ~self.correct
        pairs, counts = np.unique(np.stack([self.labels[wrong], self.top5[wrong, 0]], axis=1), axis=0,
                                  return_counts=True) if wrong.any() else (np.zeros((0, 2), int), np.zeros(0, int))
        order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
        per_true = np.bincount(self.labels, minlength=int(self.labels.max(initial=0)) + 1)
        return [{"true": int(pairs[i, 0]), "predicted": int(pairs[i, 1]), "count": int(counts[i]),
                 "share": counts[i] / per_true[pairs[i, 0]]} for i in order]

    def examples(self, count: int = 24, seed: int = 0) -> list[int]:
        """Rows to show: half wrong and half right (the rest right, or wrong, where one kind runs
        out), drawn with `seed`, so the same predictions always show the same images."""
        rng = np.random.default_rng(seed)
        wrong = rng.permutation(np.flatnonzero(~self.correct)).tolist()
        right = rng.permutation(np.flatnonzero(self.correct)).tolist()
        take_wrong = min(len(wrong), max(count // 2, count - len(right)))
        chosen = wrong[:take_wrong] + right[:count - take_wrong]
        return sorted(chosen, key=lambda i: (bool(self.correct[i]), str(self.keys[i])))


def from_top5(keys: list[str], labels, top5, probabilities, weights: str, epoch: int) -> Predictions:
    """Predictions from an evaluation's top-5 (rows in the keys' order); one line if they disagree in length."""
    labels, top5, probabilities = (np.asarray(a) for a in (labels, top5, probabilities))
    if not (len(keys) == len(labels) == len(top5) == len(probabilities)):
        raise PredictionsError(f"{len(keys)} val keys but {len(labels)} predictions: the loader's order is not the "
                               f"shards' (predictions are kept for the DALI loader only)")
    return Predictions(np.asarray(keys, dtype=str), labels, top5, probabilities, weights, epoch)
