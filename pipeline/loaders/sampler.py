"""Which global indices a rank reads in an epoch, in which order: a pure function of
(num_samples, seed, epoch, rank, world_size).

Order: a permutation of 0..N-1 drawn by numpy from (seed, epoch) (or 0..N-1 with shuffle=False).
Partition: rank r takes every world_size-th element starting at r (strided).
Remainder, drop_last=True (training): the permutation is cut to floor(N / world) x world first, so
every rank has the same number of samples (and of batches, floor(per_rank / batch_size)); the cut-off
samples (< world_size of them, plus < batch_size per rank for the batch remainder) are different ones
each epoch, because the permutation changes. drop_last=False (evaluation): nothing is dropped; ranks
may differ by one sample and the last batch may be short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True, slots=True, frozen=True)
class EpochSampler:
    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size}: want 0 <= rank < world_size")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: must be >= 0")
        if self.drop_last and self.samples_per_rank < self.batch_size:
            raise ValueError(f"{self.num_samples} samples over {self.world_size} ranks give "
                             f"{self.samples_per_rank} per rank, fewer than one batch of {self.batch_size}")

    @property
    def samples_per_rank(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        per = self.samples_per_rank
        return per // self.batch_size if self.drop_last else -(-per // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's global indices for `epoch`, in reading order (int64)."""
        n = self.num_samples
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, 0x5A3]).permutation(n)
        else:
            perm = np.arange(n)
        if self.drop_last:
            perm = perm[: (n // self.world_size) * self.world_size]
        return perm[self.rank::self.world_size].astype(np.int64)

    def batches(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """The index batches of `epoch` from batch number `start` on."""
        order = self.epoch_order(epoch)
        b = self.batch_size
        return [order[i * b:(i + 1) * b] for i in range(start, len(self))]
