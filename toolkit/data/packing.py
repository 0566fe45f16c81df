"""Sequence packing: records laid end to end in fewer rows, each attending to itself, and the
model's other layers computing real tokens only.

The records every data-parallel rank runs at one accumulation step are shared out between the
ranks by their tokens, and each rank packs its share. The step holds the same records as the padded
one, so its loss and gradient are the padded step's (the loss is a sum over the step's tokens,
whichever rank computes them); only the padding is gone. A rank's compute grows with its real
tokens, the rows costing only attention, and every rank waits for the slowest at the gradient
reduction: so records, not rows, are dealt out, longest first to the rank with fewest tokens,
which evens the ranks' tokens far better than dealing out the rows of one packing.

The model gets the rows' real tokens as one flat sequence and runs only attention in the rows
(``toolkit.models.packed_attention``). Position ids restart at each record, and in the rows a 4-D
block-diagonal causal mask keeps records apart: position ids alone do not, under eager or sdpa
attention (a second record's logits move by tenths without the mask). The first
token of each record gets no label, as in a padded row, where position 0 is never predicted.
"""

from __future__ import annotations

import numpy as np
import torch

from toolkit.data.batches import EncodedSet
from toolkit.loss import IGNORE


def longest_first(lengths: np.ndarray) -> list[int]:
    """Positions in ``lengths``, by decreasing length (in order of position on a tie)."""
    return sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))


def plan_rows(lengths: np.ndarray, width: int) -> list[list[int]]:
    """Records (positions in ``lengths``) per row, first-fit by decreasing length; each row <= width."""
    rows: list[list[int]] = []
    room: list[int] = []
    for position in longest_first(lengths):
        size = int(lengths[position])
        row = next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([position])
            room.append(width - size)
        else:
            rows[row].append(position)
            room[row] -= size
    return rows


def share_out(lengths: np.ndarray, shares: int) -> list[list[int]]:
    """Records (positions in ``lengths``) per share, longest first to the share with fewest tokens
    (the first of them on a tie): the shares' tokens differ by at most the longest record, and each
    share gets a record when there are as many records as shares."""
    tokens = [0] * shares
    dealt: list[list[int]] = [[] for _ in range(shares)]
    for position in longest_first(lengths):
        share = tokens.index(min(tokens))
        dealt[share].append(position)
        tokens[share] += int(lengths[position])
    return dealt


def pack(data: EncodedSet, indices, width: int, dtype: torch.dtype = torch.float32,
         share: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Share the records ``indices`` out between ``n`` ranks (:func:`share_out`) and pack share ``r``
    (``share=(r, n)``) into rows of ``width`` tokens.

    The share's records come as one flat sequence of their real tokens, row after row, with the
    plan of the rows their attention runs in (``toolkit.models.packed_attention``): every layer
    but attention then computes real tokens only. Rows are ``width`` slots long, so that packed
    micro-batches differ in their number of rows and tokens only, which a compiled model runs with
    one graph.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` (1, N); ``attention_mask`` (rows, 1, width,
        width): 0 where a row slot may attend, the dtype's minimum elsewhere; ``row_slots``
        (rows x width): the token each row slot holds, N for padding; ``token_slots`` (N): the row
        slot of each token; ``logits_to_keep`` (T): the positions whose next token is a target,
        and ``targets`` (1, T): those targets, for a model that computes its logits there only
        (transformers' ``logits_to_keep``).
    """
    mine, shares = share
    indices = np.asarray(indices)
    indices = indices[share_out(data.lengths[indices], shares)[mine]]
    rows = plan_rows(data.lengths[indices], width)
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    token_slots: list[int] = []
    # segment id of each slot; padding gets its own id per slot so that it attends to itself
    # only (a fully masked row would give NaN, and NaN times a zero gradient is NaN)
    segments = torch.arange(width).repeat(len(rows), 1) + len(indices) + 1
    for r, row in enumerate(rows):
        start = r * width
        for segment, position in enumerate(row):
            record = int(indices[position])
            n = int(data.lengths[record])
            input_ids += data.input_ids[record]
            labels += [IGNORE, *data.labels[record][1:]]  # not predicted from the record before it
            positions += range(n)
            token_slots += range(start, start + n)
            segments.view(-1)[start:start + n] = segment
            start += n
    token_slots = torch.tensor(token_slots)
    row_slots = torch.full((len(rows) * width,), len(input_ids), dtype=torch.long)
    row_slots[token_slots] = torch.arange(len(input_ids))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    following = torch.tensor(labels[1:])  # the label of the token after each one
    scored = (following != IGNORE).nonzero().view(-1)
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "attention_mask": mask[:, None],
            "row_slots": row_slots, "token_slots": token_slots,
            "logits_to_keep": scored, "targets": following[scored][None]}
