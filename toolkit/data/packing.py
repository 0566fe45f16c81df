"""Sequence packing: records laid end to end in fewer rows, each attending to itself, and the
model's other layers computing real tokens only.

The records every data-parallel rank runs at one accumulation step are packed together, and each
rank runs its share of the rows. The step holds the same records as the padded one, so its loss
and gradient are the padded step's (the loss is a sum over the step's tokens, whichever rank
computes them); only the padding is gone, and the ranks get as many rows as each other, give or
take one. Packed per rank instead, GSM8K's records (61% longer than half a row) left the slower of
2 ranks 6.5 rows of 256 tokens for 8 records on average, against 6.0 packed together.

The model gets the rows' real tokens as one flat sequence and runs only attention in the rows
(``toolkit.models.packed_attention``). Position ids restart at each record, and in the rows a 4-D
block-diagonal causal mask keeps records apart: position ids alone do not, under eager or sdpa
attention (measured with transformers 5.24: a second record's logits moved by 0.4-0.5). The first
token of each record gets no label, as in a padded row, where position 0 is never predicted.
"""

from __future__ import annotations

import numpy as np
import torch

from toolkit.data.batches import EncodedSet
from toolkit.data.formats import IGNORE


def plan_rows(lengths: np.ndarray, width: int, min_rows: int = 1) -> list[list[int]]:
    """Records (positions in ``lengths``) per row, first-fit by decreasing length; each row <= width.

    The ``min_rows`` longest records open a row each, so that there are at least that many rows
    (given as many records): every rank sharing them gets one.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        size = int(lengths[position])
        row = None if len(rows) < min_rows else next((r for r, free in enumerate(room) if free >= size), None)
        if row is None:
            rows.append([position])
            room.append(width - size)
        else:
            rows[row].append(position)
            room[row] -= size
    return rows


def pack(data: EncodedSet, indices, width: int, dtype: torch.dtype = torch.float32,
         share: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Pack the records ``indices`` into rows of ``width`` tokens and keep one share of the rows:
    with ``share=(r, n)``, rows r, r + n, r + 2n, ... (at least one).

    The share's records come as one flat sequence of their real tokens, row after row, with the
    plan of the rows their attention runs in (``toolkit.models.packed_attention``): every layer
    but attention then computes real tokens only. Rows are ``width`` slots long, so that packed
    micro-batches differ in their number of rows and tokens only, which a compiled model runs with
    one graph.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids`` (1, N); ``attention_mask`` (rows, 1, width,
        width): 0 where a row slot may attend, the dtype's minimum elsewhere; ``row_slots``
        (rows x width): the token each row slot holds, N for padding; ``token_slots`` (N): the row
        slot of each token.
    """
    indices = np.asarray(indices)
    mine, shares = share
    rows = plan_rows(data.lengths[indices], width, min_rows=shares)[mine::shares]
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
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "attention_mask": mask[:, None],
            "row_slots": row_slots, "token_slots": token_slots}
