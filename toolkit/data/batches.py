"""Deterministic global batches, the same in every parallel layout, and padding collation.

Step ``s`` uses a fixed set of ``micro_batch_size x grad_accum x data_parallel`` records, cut into
micro-batches numbered ``k``. Rank ``r`` runs micro-batch ``k = j x data_parallel + r`` at
accumulation step ``j``, so one rank with 2 accumulation steps and two ranks with 1 see the same
micro-batches: losses match across layouts, and the data position after step ``s`` is just ``s``,
which makes resume exact without saving any loader state. Grouping by length reorders records
inside a step only, so it keeps both properties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.errors import UserError
from toolkit.loss import IGNORE


@dataclass
class EncodedSet:
    """A tokenised data set: ids and labels per record, plus their sizes for loss normalisation."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __post_init__(self):
        self.lengths = np.array([len(ids) for ids in self.input_ids], dtype=np.int64)
        # position 0 is never predicted: a causal LM predicts token t+1 from tokens <= t
        self.targets = np.array([sum(l != IGNORE for l in lab[1:]) for lab in self.labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)


class GlobalBatches:
    """Which records each rank uses at each step, and the token counts of the whole step."""

    def __init__(self, data: EncodedSet, micro_batch_size: int, grad_accum: int,
                 data_parallel: int, rank: int, seed: int, group_by_length: bool = False):
        self.data, self.mbs, self.gas = data, micro_batch_size, grad_accum
        self.dp, self.rank, self.seed, self.group_by_length = data_parallel, rank, seed, group_by_length
        self.global_size = micro_batch_size * grad_accum * data_parallel
        self.steps_per_epoch = len(data) // self.global_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the training set has {len(data)} records, fewer than one global batch "
                            f"({self.global_size} = micro_batch_size x grad_accum x data-parallel ranks)",
                            "add data or lower train.micro_batch_size / train.grad_accum")
        self._order_epoch, self._order = -1, None

    def _step_records(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._order_epoch = epoch
        return self._order[index * self.global_size:(index + 1) * self.global_size]

    def accumulation_steps(self, step: int) -> list[np.ndarray]:
        """For each of ``step``'s ``grad_accum`` accumulation steps, the records every data-parallel
        rank runs in it: micro-batches ``j x dp`` to ``j x dp + dp - 1``, rank by rank."""
        records = self._step_records(step)
        if self.group_by_length:
            # neighbours in length share a micro-batch, and micro-batches that run at the same
            # time on different ranks (k = j x dp + r) are close in length too
            records = records[np.argsort(self.data.lengths[records], kind="stable")]
        return list(records.reshape(self.gas, self.dp * self.mbs))

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's ``grad_accum`` micro-batches (record indices) for ``step``."""
        return [group[self.rank * self.mbs:(self.rank + 1) * self.mbs] for group in self.accumulation_steps(step)]

    def target_tokens(self, step: int) -> int:
        """Loss-bearing tokens in the whole step, over every rank: the loss normaliser."""
        return int(self.data.targets[self._step_records(step)].sum())

    def tokens(self, step: int) -> int:
        """Non-padding tokens in the whole step, over every rank."""
        return int(self.data.lengths[self._step_records(step)].sum())


def collate(data: EncodedSet, indices, pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to ``width`` or its longest record; padding has label -100, mask 0."""
    width = width or int(data.lengths[indices].max())
    batch = {"input_ids": torch.full((len(indices), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(indices), width), dtype=torch.long),
             "labels": torch.full((len(indices), width), IGNORE, dtype=torch.long)}
    for row, index in enumerate(indices):
        n = int(data.lengths[index])
        batch["input_ids"][row, :n] = torch.tensor(data.input_ids[index])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(data.labels[index])
    return batch


def eval_shards(size: int, micro_batch_size: int, data_parallel: int, rank: int) -> list[np.ndarray]:
    """This rank's eval micro-batches; every rank gets the same number of them.

    Under ZeRO-3 each forward pass is collective, so ranks must run equally many; missing slots
    are -1 and the caller masks them out of the loss.
    """
    per_rank = -(-size // data_parallel)
    batches = -(-per_rank // micro_batch_size)
    padded = np.full(batches * micro_batch_size * data_parallel, -1, dtype=np.int64)
    padded[:size] = np.arange(size)
    mine = padded[rank::data_parallel]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
