"""The one text normalization every check shares, and the vectorised hashing of its words.

Normalization is Unicode NFKC, case folding, punctuation and symbols to spaces, and whitespace runs to
one space, so ``"What is 12+34?"`` becomes ``"what is 12 34"``. It runs on a whole batch joined into
one string, so the work happens in C (``unicodedata``, one regex for non-ASCII characters, and a
256-entry byte table for ASCII), not in a Python loop per character. Normalized texts are UTF-8 bytes,
which is what the hashing below reads.

Words, n-grams and shingles are hashed to 64-bit integers with numpy over the batch's bytes: a record
is never split into Python strings. Hashes are deterministic across processes and runs (no
``hash()``), so results do not depend on ``PYTHONHASHSEED`` or on the worker count.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

# Records are joined with NUL: NFKC and case folding never produce or remove it, and neither the
# regex nor the byte table below touches it.
_SEP = "\x00"
_NON_ASCII_NON_WORD = re.compile(r"[^\x00-\x7F\w]")  # non-ASCII punctuation, symbols and spaces
# One byte table does the ASCII part: letters to lower case, other bytes except digits and NUL to
# spaces (`_` too: punctuation to us). Bytes of multi-byte characters (>= 0x80) belong to letters or
# digits by then, and stay.
_ASCII_FOLD = bytes(b if b >= 0x80 or b == 0 else ord(chr(b).lower()) if chr(b).isalnum() else 0x20
                    for b in range(256))

_U64 = np.uint64
_RNG = np.random.default_rng(0x5EED)
# One random odd multiplier per byte offset inside a word (offsets wrap after 256 bytes).
_OFFSET_MULTIPLIERS = _RNG.integers(1, 2**63, size=256, dtype=np.uint64) | _U64(1)
# One per word position inside an n-gram, so "a b" and "b a" hash differently.
_POSITION_MULTIPLIERS = _RNG.integers(1, 2**63, size=64, dtype=np.uint64) | _U64(1)
MAX_NGRAM = len(_POSITION_MULTIPLIERS)


def normalize(texts: Sequence[str]) -> list[bytes]:
    """Normalize a batch of texts.

    Args:
        texts: Raw texts.

    Returns:
        One normalized text per input, as UTF-8 bytes, words separated by single spaces.
    """
    if not texts:
        return []
    texts = [t.replace(_SEP, " ") for t in texts] if any(_SEP in t for t in texts) else list(texts)
    # Only non-ASCII texts need NFKC, full case folding and the regex; ASCII ones are already in
    # NFKC form and the byte table does the rest.
    unusual = [i for i, t in enumerate(texts) if not t.isascii()]
    if unusual:
        folded = unicodedata.normalize("NFKC", _SEP.join(texts[i] for i in unusual)).casefold()
        for i, text in zip(unusual, _NON_ASCII_NON_WORD.sub(" ", folded).split(_SEP)):
            texts[i] = text
    data = np.frombuffer(_SEP.join(texts).encode().translate(_ASCII_FOLD), dtype=np.uint8)
    return _collapse_spaces(data).tobytes().split(b"\x00")


def _collapse_spaces(data: np.ndarray) -> np.ndarray:
    """Drop spaces so that each run of them becomes one space between words, and none at the ends."""
    space = data == 0x20
    starts = np.flatnonzero(space & ~np.r_[False, space[:-1]])
    ends = np.flatnonzero(space & ~np.r_[space[1:], False])
    inner = (starts > 0) & (ends < data.size - 1)  # a run at either end of the batch always goes
    inner[inner] = (data[starts[inner] - 1] != 0) & (data[ends[inner] + 1] != 0)
    keep = ~space
    keep[starts[inner]] = True
    return data[keep]


def digests(normalized: Sequence[bytes]) -> np.ndarray:
    """128-bit content hashes of normalized texts, for exact-duplicate grouping.

    Args:
        normalized: Output of :func:`normalize`.

    Returns:
        ``(len(normalized), 2)`` uint64 array; equal rows mean equal texts (collision odds ~2**-128).
    """
    raw = b"".join(hashlib.blake2b(t, digest_size=16).digest() for t in normalized)
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2).copy()


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: spreads every input bit over the 64 output bits."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


# The hash of every number word, where numbers do not matter (contamination).
NUMBER = mix64(np.array([0x4E554D42455253], _U64))[0]


def word_hashes(normalized: Sequence[bytes], numbers_as_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Hash every word of a batch of normalized texts.

    Args:
        normalized: Output of :func:`normalize`.
        numbers_as_one: Give every word that starts with a digit the one hash :data:`NUMBER`, so
            that a text with its numbers swapped (``"12 apples"`` / ``"7 apples"``) hashes alike.

    Returns:
        ``(hashes, owners)``: uint64 hash per word in reading order, and the int64 index of the text
        each word belongs to.
    """
    data = np.frombuffer(b"\x00".join(normalized), dtype=np.uint8)
    boundary = (data == 0x20) | (data == 0x00)
    starts = np.flatnonzero(~boundary & np.concatenate(([True], boundary[:-1])))
    if starts.size == 0:
        return np.zeros(0, _U64), np.zeros(0, np.int64)
    # A word's hash is sum((byte + 1) * M[offset in word]) over its bytes, mixed; boundary bytes
    # weigh 0. Offsets come from the start of the word each byte belongs to.
    is_start = np.zeros(data.size, np.int64)
    is_start[starts] = 1
    word_of_byte = np.cumsum(is_start) - 1
    offsets = (np.arange(data.size) - starts[word_of_byte]) & 0xFF
    weighted = (data.astype(_U64) + _U64(1)) * _OFFSET_MULTIPLIERS[offsets]
    weighted[boundary] = 0
    hashes = mix64(np.add.reduceat(weighted, starts))
    if numbers_as_one:  # a word that starts with a digit: 12, 2 (of 2.5), 3rd, 5pm; not a code like ab12
        hashes[(data[starts] >= 0x30) & (data[starts] <= 0x39)] = NUMBER
    owners = np.searchsorted(np.flatnonzero(data == 0x00), starts).astype(np.int64)
    return hashes, owners


def ngram_hashes(
    hashes: np.ndarray, owners: np.ndarray, n: int, keep_short: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Hash every run of ``n`` consecutive words that lies inside one text.

    Args:
        hashes: Word hashes from :func:`word_hashes`.
        owners: Text index of each word, non-decreasing.
        n: Words per n-gram, 1 to :data:`MAX_NGRAM`.
        keep_short: For a text of fewer than ``n`` words, emit one n-gram of all its words (shingles,
            so short texts can still be compared); otherwise emit none (contamination, where a short
            match means nothing).

    Returns:
        ``(gram_hashes, gram_owners)`` in reading order; duplicates within a text are kept.
    """
    total = hashes.size
    if total == 0:
        return np.zeros(0, _U64), np.zeros(0, np.int64)
    position = np.arange(total)
    acc = np.zeros(total, _U64)
    inside = np.ones(total, bool)
    for offset in range(n):
        follower = np.minimum(position + offset, total - 1)
        inside &= (position + offset < total) & (owners[follower] == owners)
        acc += np.where(inside, hashes[follower] * _POSITION_MULTIPLIERS[offset], _U64(0))
    keep = inside  # after the loop: the whole n-gram lies inside one text
    if keep_short:
        first_word = np.concatenate(([True], owners[1:] != owners[:-1]))
        words_in_text = np.bincount(owners)[owners]
        keep = keep | (first_word & (words_in_text < n))
    return mix64(acc[keep]), owners[keep]


def unique_per_owner(values: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop values repeated within one owner, keeping reading order (owners stay non-decreasing)."""
    # One 64-bit key per (owner, value) pair: sorting one key is ~4x faster than a two-key lexsort,
    # and two distinct pairs share a key with odds of about 2**-64.
    keys = mix64(values ^ (owners.astype(_U64) * _POSITION_MULTIPLIERS[0]))
    order = np.argsort(keys)
    fresh = np.ones(keys.size, bool)
    fresh[1:] = keys[order[1:]] != keys[order[:-1]]
    keep = np.zeros(keys.size, bool)
    keep[order[fresh]] = True
    return values[keep], owners[keep]
