"""Turning records into token ids and labels: text, instruction and chat formats.

Labels are -100 wherever no loss is wanted (the prompt, non-assistant chat turns), so one loss
function serves every format. Every example ends in EOS so a model learns to stop.
"""

from __future__ import annotations

from typing import Any

from toolkit.data.batches import EncodedSet
from toolkit.data.records import load_records
from toolkit.loss import IGNORE


def encode_text(record: dict, tokenizer, fields: Any) -> tuple[list[int], list[int]]:
    ids = tokenizer(record[fields.text_field])["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def encode_instruction(record: dict, tokenizer, fields: Any) -> tuple[list[int], list[int]]:
    # Tokenised apart so the boundary is exact: the prompt gets the tokenizer's BOS, the response
    # none, and every response token (plus EOS) is a target.
    prompt = tokenizer(record[fields.prompt_field])["input_ids"]
    response = tokenizer(record[fields.response_field], add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE] * len(prompt) + response


def encode_chat(record: dict, tokenizer, fields: Any) -> tuple[list[int], list[int]]:
    messages = record[fields.messages_field]

    def render(upto: int, generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(messages[:upto], tokenize=True,
                                            add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    ids = render(len(messages), False)
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            # The template renders prefixes identically, so an assistant turn is the span between
            # "everything before it + generation prompt" and "everything up to it".
            start, end = len(render(turn, True)), len(render(turn + 1, False))
            labels[start:end] = ids[start:end]
    return ids, labels


ENCODERS = {"text": encode_text, "instruction": encode_instruction, "chat": encode_chat}


def encode(record: dict, tokenizer, fields: Any, seq_len: int) -> dict[str, list[int]]:
    """Token ids and labels of one record, truncated to ``seq_len``.

    Args:
        record: one row of the data set.
        tokenizer: a HF tokenizer with ``eos_token_id``.
        fields: the recipe's ``data`` section (format and field names).
        seq_len: the longest sequence kept.
    """
    ids, labels = ENCODERS[fields.format](record, tokenizer, fields)
    return {"input_ids": ids[:seq_len], "labels": labels[:seq_len]}


def encode_set(source: str, tokenizer, fields, seq_len: int, limit: int | None = None,
               trust_remote_code: bool = False) -> EncodedSet:
    """Load ``source`` and encode every record in the recipe's format.

    Args:
        source: a file, folder or hub id (already resolved from ``builtin:`` names).
        tokenizer: the model's tokenizer.
        fields: the recipe's ``data`` section.
        seq_len: records are truncated to this many tokens.
        limit: keep only the first ``limit`` records.
    """
    records = load_records(source, trust_remote_code=trust_remote_code)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    # a plain loop: datasets.map costs more than the encoding itself, and every rank encodes at start-up
    encoded = [encode(record, tokenizer, fields, seq_len) for record in records.to_list()]
    return EncodedSet([e["input_ids"] for e in encoded], [e["labels"] for e in encoded])
