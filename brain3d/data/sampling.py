"""A batch sampler that can start an epoch part-way through, for resuming a run mid-epoch.

The training loader's shuffle is seeded per epoch (``seed * 100_003 + epoch``), so an epoch's batch order
is known in advance; after a mid-epoch resume the first ``k`` batches are skipped here, as index lists,
without loading a single volume.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from torch.utils.data import BatchSampler


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` whose iterations start at batch ``start`` (0: the whole epoch).

    ``len()`` stays the full epoch length: the training loop counts steps by their index in the whole
    epoch (accumulation boundaries, augmentation seeds), whatever batch it starts from. Use
    :func:`iter_from` rather than setting ``start`` by hand.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, rank: int = 0, world_size: int = 1):
        super().__init__(sampler, batch_size, drop_last)
        self.start = 0
        # Distributed training: the epoch's global batch order is the same on every rank (same seed) and rank r
        # takes batches r, r+W, r+2W, ...; the tail is dropped so every rank runs the same number of steps.
        self.rank, self.world_size = rank, world_size
        # With an epoch set (set_epoch), batches are lists of (index, epoch) pairs: persistent DataLoader workers
        # keep their own copy of the dataset, so the epoch must travel with the indices (VolumeDataset seeds its
        # patches by (seed, epoch, index)).
        self.epoch: int | None = None

    def set_epoch(self, epoch: int | None, shuffle_seed: int | None = None) -> None:
        """Tag every index of the following iterations with ``epoch`` (None: plain indices), and re-seed the
        shuffle (the sampler's generator) with ``shuffle_seed``. The order then depends on nothing but the
        seed: not on the DataLoader, which draws its workers' base seed from its own generator."""
        self.epoch = epoch
        if shuffle_seed is not None:
            self.sampler.generator.manual_seed(shuffle_seed)

    def __len__(self) -> int:
        if self.world_size == 1:
            return super().__len__()
        return super().__len__() // self.world_size

    def __iter__(self) -> Iterator[list]:
        # The shuffled order is drawn as in a full epoch, so the batches after the skip are exactly those of
        # an uninterrupted run.
        if self.world_size == 1:
            batches = itertools.islice(super().__iter__(), self.start, None)
        else:
            shard = itertools.islice(super().__iter__(), self.rank, len(self) * self.world_size, self.world_size)
            batches = itertools.islice(shard, self.start, None)
        if self.epoch is None:
            return batches
        epoch = self.epoch
        return ([(index, epoch) for index in batch] for batch in batches)


def iter_from(loader: Iterable, start: int) -> Iterator:
    """An iterator over ``loader``'s batches from index ``start`` on.

    With a :class:`ResumableBatchSampler` the first ``start`` batches are skipped as indices, never loaded;
    any other loader reads and drops them.
    """
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, ResumableBatchSampler):
        return itertools.islice(iter(loader), start, None)
    sampler.start = start
    try:
        # A DataLoader with worker processes calls iter() on its sampler twice while it builds its iterator
        # (__init__ and _reset), so `start` must hold until iter(loader) returns, and no longer: only this
        # epoch starts part-way.
        return iter(loader)
    finally:
        sampler.start = 0
