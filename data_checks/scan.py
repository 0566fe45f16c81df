"""One pass over a set, in batches, computing what every check needs.

The per-batch work (:func:`featurize`: normalization, hashing, MinHash, n-grams, PII regexes) is
pure and picklable, so large sets spread it over worker processes; results come back in order and
only a bounded number of batches are in flight, so memory stays flat. What a set keeps is numpy
arrays (content hashes, shingle hashes, band keys, n-gram hits): no Python object per record.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from data_checks import normalize, pii
from data_checks.duplicates import MinHasher

if TYPE_CHECKING:  # worker processes import this module without `datasets`
    from data_checks.sources import Batch, Source

BATCH_SIZE = 5000  # records per batch: large enough for numpy, small enough for cache and IPC
PARALLEL_MIN_RECORDS = 50_000  # below this, starting worker processes costs more than it saves
_MAX_WORKERS = 8
_IN_FLIGHT = 16  # batches submitted ahead of the one being collected

CountTokens = Callable[[list[str]], Sequence[int]]


@dataclass(frozen=True)
class ScanPlan:
    """What one pass computes; it travels to worker processes with each batch.

    Attributes:
        minhasher: MinHash for near duplicates; None skips shingles and band keys.
        shingle_words: Words per shingle.
        held_ngram: N-gram size of this set's items as contamination targets; None: not a target.
        reference_ngram: N-gram size of this set's text as contamination reference; None: not one.
        numbers_as_one: Contamination n-grams hash every number word alike (number swaps).
        pii_kinds: PII kinds to look for.
        responses: Compute prompt and response hashes (for the poisoning screen).
    """

    minhasher: MinHasher | None = None
    shingle_words: int = 5
    held_ngram: int | None = None
    reference_ngram: int | None = None
    numbers_as_one: bool = False
    pii_kinds: tuple[str, ...] = ()
    responses: bool = False


@dataclass
class SplitScan:
    """What a pass over one set found, as arrays indexed by the set's loaded rows."""

    source: Source
    offset: int  # global id of the set's first record, across all sets of the audit
    digests: np.ndarray  # (n, 2) uint64 content hashes of the normalized full text
    empty: np.ndarray  # (n,) bool: nothing left after normalization
    shingles: np.ndarray | None = None  # shingle hashes, record by record (repeats kept)
    shingle_offsets: np.ndarray | None = None  # (n + 1,)
    bands: np.ndarray | None = None  # (n, bands) LSH keys
    held: tuple[np.ndarray, np.ndarray] | None = None  # (n-gram hash, item) of the prompt views, every position
    vocabulary: np.ndarray | None = None  # sorted held-out n-grams this set was looked up against
    reference_hits: tuple[np.ndarray, np.ndarray] | None = None  # (vocabulary index, record)
    max_tokens: int | None = None  # the length limit the overlong check used
    prompt_digests: np.ndarray | None = None  # (n,) uint64
    response_digests: np.ndarray | None = None  # (n,) uint64
    pii: list[tuple[int, str, str]] = field(default_factory=list)  # (record, kind, masked value)
    blanks: list[tuple[int, str, str]] = field(default_factory=list)  # (record, field, missing|empty)
    overlong: list[tuple[int, int]] = field(default_factory=list)  # (record, tokens)


def featurize(full: list[str], prompt: list[str], response: list[str] | None, plan: ScanPlan) -> dict:
    """Compute one batch's features (runs in worker processes).

    Args:
        full: The records' full texts.
        prompt: Their prompt views (the same list for plain text).
        response: Their response views, or None.
        plan: What to compute.

    Returns:
        A dict of arrays; see :class:`SplitScan` for their meaning. Indices are batch offsets.
    """
    normalized = normalize.normalize(full)
    out: dict = {"digests": normalize.digests(normalized), "empty": np.array([not t for t in normalized])}
    words, owners = normalize.word_hashes(normalized)
    if plan.minhasher is not None:
        # Repeats within a record stay: they do not change a MinHash minimum, and Jaccard drops them
        # for the few records it compares, which is cheaper than sorting every record's shingles.
        shingles, shingle_owners = normalize.ngram_hashes(words, owners, plan.shingle_words, keep_short=True)
        out["shingles"] = shingles
        out["shingle_counts"] = np.bincount(shingle_owners, minlength=len(full))
        out["bands"] = plan.minhasher.band_keys(shingles, shingle_owners, len(full))
    if plan.reference_ngram:
        numbered = normalize.word_hashes(normalized, numbers_as_one=True)[0] if plan.numbers_as_one else words
        out["reference"] = normalize.unique_per_owner(
            *normalize.ngram_hashes(numbered, owners, plan.reference_ngram, keep_short=False))
    if plan.held_ngram or plan.responses:
        prompts = normalized if prompt is full else normalize.normalize(prompt)
        if plan.held_ngram:
            prompt_words, prompt_owners = normalize.word_hashes(prompts, numbers_as_one=plan.numbers_as_one)
            # every position, repeats kept: coverage needs to know which words each n-gram spans
            out["held"] = normalize.ngram_hashes(prompt_words, prompt_owners, plan.held_ngram, keep_short=False)
        if plan.responses and response is not None:
            out["prompt_digests"] = normalize.digests(prompts)[:, 0]
            out["response_digests"] = normalize.digests(normalize.normalize(response))[:, 0]
    out["pii"] = pii.find(full, plan.pii_kinds) if plan.pii_kinds else []
    return out


def scan_split(
    source: Source,
    offset: int,
    plan: ScanPlan,
    executor: Executor | None,
    vocabulary: np.ndarray | None = None,
    max_tokens: int | None = None,
    count_tokens: CountTokens | None = None,
) -> SplitScan:
    """Run one pass over a set.

    Args:
        source: The set.
        offset: Global id of its first record.
        plan: What to compute per batch.
        executor: Worker processes, or None to work in this process.
        vocabulary: Sorted held-out n-gram hashes to look up in this set's reference n-grams.
        max_tokens: Report records longer than this; None skips the length check.
        count_tokens: Tokens per text for a batch of texts; default: whitespace-separated words.

    Returns:
        The set's features.
    """
    parts: dict[str, list] = {}
    scan = SplitScan(source, offset, np.zeros((0, 2), np.uint64), np.zeros(0, bool),
                     vocabulary=vocabulary, max_tokens=max_tokens)
    progress = tqdm(total=len(source), unit="rec", desc=f"audit {source.name}", leave=False)
    with progress:
        for batch, features in _in_order(executor, source.batches(BATCH_SIZE), plan):
            start = int(batch.positions[0])
            reference = features.pop("reference", None)
            if reference is not None and vocabulary is not None:
                parts.setdefault("hits", []).append(_lookup(reference[0], reference[1] + start, vocabulary))
            if "held" in features:
                grams, items = features.pop("held")
                parts.setdefault("held", []).append((grams, items + start))
            scan.pii += [(start + i, kind, value) for i, kind, value in features.pop("pii")]
            for key, value in features.items():
                parts.setdefault(key, []).append(value)
            scan.blanks += [(start + i, name, what) for i, name, what in batch.blanks]
            if max_tokens is not None:
                counts = np.asarray(count_tokens(batch.full) if count_tokens else
                                    [len(t.split()) for t in batch.full])
                scan.overlong += [(start + int(i), int(counts[i])) for i in np.flatnonzero(counts > max_tokens)]
            progress.update(len(batch.full))
    scan.digests = np.concatenate(parts["digests"])
    scan.empty = np.concatenate(parts["empty"])
    if "shingles" in parts:
        scan.shingles = np.concatenate(parts["shingles"])
        scan.shingle_offsets = np.r_[0, np.cumsum(np.concatenate(parts["shingle_counts"]))]
        scan.bands = np.concatenate(parts["bands"])
    if "held" in parts:
        scan.held = (np.concatenate([g for g, _ in parts["held"]]), np.concatenate([i for _, i in parts["held"]]))
    if "hits" in parts:
        scan.reference_hits = (np.concatenate([v for v, _ in parts["hits"]]),
                               np.concatenate([r for _, r in parts["hits"]]))
    if "prompt_digests" in parts:
        scan.prompt_digests = np.concatenate(parts["prompt_digests"])
        scan.response_digests = np.concatenate(parts["response_digests"])
    return scan


def make_executor(records: int, workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for an audit of this many records, or None when in-process is faster.

    Args:
        records: Records in all sets together.
        workers: Requested processes; 0 means one per CPU core, at most 8.
    """
    workers = workers or min(os.cpu_count() or 1, _MAX_WORKERS)
    if workers <= 1 or records < PARALLEL_MIN_RECORDS:
        return None
    # spawn, not fork: the parent may hold Arrow and tqdm threads, which fork does not copy safely.
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))


def _in_order(executor: Executor | None, batches: Iterable[Batch], plan: ScanPlan) -> Iterator[tuple]:
    """Yield ``(batch, featurize(batch))`` in order, with a bounded number of batches in flight."""
    if executor is None:
        for batch in batches:
            yield batch, featurize(batch.full, batch.prompt, batch.response, plan)
        return
    window: deque = deque()
    for batch in batches:
        window.append((batch, executor.submit(featurize, batch.full, batch.prompt, batch.response, plan)))
        if len(window) >= _IN_FLIGHT:
            done, future = window.popleft()
            yield done, future.result()
    while window:
        done, future = window.popleft()
        yield done, future.result()


def _lookup(grams: np.ndarray, records: np.ndarray, vocabulary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vocabulary index, record) for every n-gram that is in the sorted vocabulary."""
    if vocabulary.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    position = np.minimum(np.searchsorted(vocabulary, grams), vocabulary.size - 1)
    found = vocabulary[position] == grams
    return position[found], records[found]
