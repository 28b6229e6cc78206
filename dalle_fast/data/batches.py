"""The batches of a training run, as a pure function of (seed, step).

Every stage draws update `step`'s batch from `step_generator(seed, step)`, so resuming at step s replays
exactly what an uninterrupted run would have drawn from step s on.
"""

from __future__ import annotations

import itertools

import torch

from dalle_fast.data.images import SkipCounter, collate_skip


def mix_seed(seed: int, step: int) -> int:
    """The one seed mix of the project: a run's seed and a step (an update, an epoch, an item) -> a seed
    no other (seed, step) pair with step < 1_000_003 shares."""
    return seed * 1_000_003 + step


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of update `step` of a run seeded `seed`."""
    return torch.Generator().manual_seed(mix_seed(seed, step))


class StepBatches(torch.utils.data.Sampler):
    """Batch indices as a pure function of (seed, step), for steps start, start + 1, ... without end
    (the run decides when to stop): resuming at step s replays exactly what an uninterrupted run would
    have drawn from step s on."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int):
        self.length, self.batch_size, self.seed, self.start = length, batch_size, seed, start

    def __iter__(self):
        for step in itertools.count(self.start):
            yield torch.randint(0, self.length, (self.batch_size,), generator=step_generator(self.seed, step)).tolist()


def step_batches(train_ds, batch_size: int, seed: int, start: int, counter: SkipCounter, workers: int = 0,
                 pin: bool = False):  # fmt: skip
    """(images, captions, skipped) batches for the updates from `start` on, without end.

    A map-style source draws them with StepBatches, so a resumed run sees exactly what an uninterrupted
    one would have. A stream (wds:) is read pass after pass, each pass shuffled with a seed drawn from
    the number of batches before it; a resumed stream restarts with a fresh shuffle (salted by the
    resume step) rather than at the sample where the run stopped, since a stream has no index to
    return to."""
    # Its own generator: the loader must not draw from the global RNG, which the gumbel noise uses and
    # the checkpoint restores.
    common = dict(
        collate_fn=collate_skip,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin,  # page-locked batches, copied to the GPU without blocking
    )
    if not isinstance(train_ds, torch.utils.data.IterableDataset):
        sampler = StepBatches(len(train_ds), batch_size, seed, start)
        yield from torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, **common)
        return
    drawn = start
    while True:
        train_ds.set_epoch(drawn)
        good = 0
        for images, captions, skipped in torch.utils.data.DataLoader(train_ds, batch_size=batch_size, **common):
            good += len(captions)
            drawn += 1
            yield images, captions, skipped
        counter.end_epoch()
        if not good:
            raise ValueError(f"a pass over the stream {counter.name} gave no usable training sample")
