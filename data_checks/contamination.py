"""N-gram contamination: how much of each eval or benchmark item the reference data covers.

An item (its prompt, user turns or text) is contaminated when at least ``min_coverage`` of its words
lie inside word n-grams (5 by default) that it shares with one record of the reference set, or when
one run of consecutive n-grams shared with that record spans ``min_span`` words. Items are first
found by what all records share with them (vectorised), then confirmed record by record, so that
common phrasing spread over many records does not add up to a copy. Coverage, not the fraction of
shared n-grams, is what survives scattered edits: one changed word breaks the n n-grams across it
but uncovers only itself, so a copy with one word in ten changed keeps most of its coverage while
only about half of its 8-grams survive. Number words compare equal by default, so swapped numbers
(GSM8K-style rewrites) do not hide a copy; reordered sentences keep the n-grams inside them.

The item side is small, so its n-grams form a sorted vocabulary that the reference set (train, or
eval for benchmarks) is streamed against: memory grows with the held-out sets, not with the
training data. Template boilerplate is left out: an n-gram found in many items of one set (a shared
instruction preamble) says nothing about a particular item, and would otherwise mark every item
contaminated; its words neither cover nor count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_checks.normalize import ngram_hashes, normalize, unique_per_owner, word_hashes
from data_checks.policy import AuditPolicy
from data_checks.report import Finding, excerpt
from data_checks.scan import SplitScan

# Which sets each reference set is checked against: train contaminating eval or a benchmark is
# leakage; eval containing benchmark items means selecting checkpoints on the benchmark.
TARGETS = {"train": ("eval", "benchmark"), "eval": ("benchmark",), "benchmark": ()}
_BOILERPLATE_MIN_ITEMS = 3


@dataclass
class ItemGrams:
    """One held-out set's item n-grams at every position, and which of them are boilerplate."""

    scan: SplitScan
    grams: np.ndarray  # uint64 n-gram hash per position, items in reading order
    items: np.ndarray  # item of each position, non-decreasing
    boilerplate: np.ndarray  # bool per position


def item_grams(scan: SplitScan, boilerplate_fraction: float) -> ItemGrams:
    """Mark the boilerplate n-grams of a held-out set's items.

    Args:
        scan: A scan of the set with ``held`` n-grams.
        boilerplate_fraction: Fraction of items (and at least 3) an n-gram must appear in to be
            boilerplate.
    """
    grams, items = scan.held
    distinct, _ = unique_per_owner(grams, items)  # an n-gram counts once per item
    values, counts = np.unique(distinct, return_counts=True)
    limit = max(_BOILERPLATE_MIN_ITEMS, math.ceil(boilerplate_fraction * np.unique(items).size))
    boilerplate = np.isin(grams, values[counts >= limit])
    return ItemGrams(scan, grams, items, boilerplate)


def vocabulary(sets: list[ItemGrams]) -> np.ndarray:
    """The sorted distinct content n-grams of several held-out sets: what a reference pass looks up."""
    if not sets:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate([s.grams[~s.boilerplate] for s in sets]))


@dataclass
class Coverage:
    """Per item of a held-out set: words covered by shared n-grams, content words, longest shared run."""

    covered: np.ndarray  # words inside shared content n-grams
    content: np.ndarray  # words inside any content n-gram
    longest: np.ndarray  # words of the longest run of consecutive shared n-grams

    @property
    def fraction(self) -> np.ndarray:
        return self.covered / np.maximum(self.content, 1)


def coverage(items: np.ndarray, shared: np.ndarray, content: np.ndarray, n: int, count: int) -> Coverage:
    """Coverage of ``count`` items from their n-grams at every position.

    Args:
        items: Item of each n-gram position, non-decreasing; an item's positions are consecutive
            and its ``k``-th n-gram spans its words ``k .. k + n - 1``.
        shared: Whether each n-gram occurs in the reference data.
        content: Whether each n-gram is content (not boilerplate); ``shared`` implies it.
    """
    first = np.r_[True, items[1:] != items[:-1]] if items.size else np.zeros(0, bool)
    ordinal = np.cumsum(first) - 1
    # items laid end to end: an item of g n-grams has g + n - 1 words
    word = np.arange(items.size) + ordinal * (n - 1)
    words_total = items.size + int(first.sum()) * (n - 1)
    word_item = np.repeat(items[first], np.bincount(ordinal, minlength=int(first.sum())) + n - 1) \
        if items.size else np.zeros(0, np.int64)

    def covered_words(mask: np.ndarray) -> np.ndarray:
        delta = np.zeros(words_total + 1, np.int64)
        np.add.at(delta, word[mask], 1)
        np.add.at(delta, word[mask] + n, -1)
        inside = np.cumsum(delta[:-1]) > 0
        return np.bincount(word_item[inside], minlength=count)

    # runs of consecutive shared n-grams inside one item
    run_start = shared & (first | ~np.r_[False, shared[:-1]])
    run_id = np.cumsum(run_start) - 1
    run_lengths = np.bincount(run_id[shared], minlength=int(run_start.sum()))
    longest = np.zeros(count, np.int64)
    np.maximum.at(longest, items[run_start], run_lengths + n - 1)
    return Coverage(covered_words(shared), covered_words(content), longest)


def findings(held: ItemGrams, reference: SplitScan, ngram: int, policy: AuditPolicy) -> list[Finding]:
    """Contamination findings of one held-out set by one reference set.

    Args:
        held: The held-out set's item n-grams.
        reference: The reference scan, whose ``reference_hits`` index into its ``vocabulary``.
        ngram: Words per n-gram.
        policy: Thresholds and severities.

    Returns:
        One finding per contaminated item, naming the item, the reference record that covers most
        of it and the longest passage they share.
    """
    severity = policy.severity_between({held.scan.source.role, reference.source.role})
    hit_index, hit_records = reference.reference_hits
    if severity is None or held.items.size == 0 or hit_index.size == 0:
        return []
    order = np.argsort(hit_index, kind="stable")
    hit_index, hit_records = hit_index[order], hit_records[order]
    content = ~held.boilerplate
    gram_index = np.searchsorted(reference.vocabulary, held.grams)  # content n-grams are all in it
    shared = content & np.isin(gram_index, hit_index)
    item_source, ref_source, con = held.scan.source, reference.source, policy.contamination
    union = coverage(held.items, shared, content, ngram, len(item_source))
    # candidates by what all reference records share with them; confirmed by the one record that
    # covers most, so that common phrasing spread over many records does not add up to a copy
    candidates = np.flatnonzero((union.content >= ngram) & ((union.fraction >= con.min_coverage)
                                                            | (union.longest >= con.min_span)))
    out = []
    # held.items is non-decreasing (reading order), so each item's positions are one slice.
    starts = np.searchsorted(held.items, candidates)
    ends = np.searchsorted(held.items, candidates, side="right")
    texts = item_source.texts(candidates, view="prompt")
    for item, start, end, text in zip(candidates.tolist(), starts, ends, texts):
        mine = gram_index[start:end]
        best = _best_record(mine, shared[start:end], content[start:end], hit_index, hit_records, ngram, con)
        if best is None:
            continue
        record, found, span = best
        reference_text = ref_source.texts(np.array([record]))[0]
        item_marked, reference_marked = _marked(text, reference_text, held.grams[start:end][span], ngram,
                                                con.numbers_as_one)
        fraction, longest = float(found.fraction[0]), int(found.longest[0])
        out.append(Finding(
            check="ngram_contamination",
            severity=severity,
            message=f"{item_source.name}[{item_source.row_of(item)}]: {fraction:.0%} of its words lie in "
                    f"{ngram}-grams of {ref_source.name}[{ref_source.row_of(record)}] (longest shared run "
                    f"{longest} words)",
            records=[{"split": item_source.name, "index": item_source.row_of(item)},
                     {"split": ref_source.name, "index": ref_source.row_of(record)}],
            evidence={"coverage": round(fraction, 4), "longest_shared_words": longest, "ngram": ngram,
                      "covered_words": int(found.covered[0]), "content_words": int(found.content[0]),
                      "coverage_by_all_records": round(float(union.fraction[item]), 4),
                      "shared_span": excerpt(_longest_span(text, span, ngram)),
                      # normalized words, the shared ones in **bold**: report.md shows them side by side
                      "item_marked": item_marked, "reference_marked": reference_marked},
        ))
    return out


_RECORDS_TRIED = 5  # per candidate item: the reference records sharing the most of its n-grams


def _best_record(grams: np.ndarray, shared: np.ndarray, content: np.ndarray, hit_index: np.ndarray,
                 hit_records: np.ndarray, n: int, con) -> tuple[int, Coverage, np.ndarray] | None:
    """The reference record that alone makes the item contaminated and covers most of it:
    (record, its coverage, which n-gram positions it shares), or None."""
    lo = np.searchsorted(hit_index, grams[shared])
    hi = np.searchsorted(hit_index, grams[shared], side="right")
    # one (position, record) pair per reference record holding the n-gram at that position
    holders = np.concatenate([hit_records[a:b] for a, b in zip(lo, hi)])
    positions = np.repeat(np.flatnonzero(shared), hi - lo)
    records, counts = np.unique(holders, return_counts=True)
    chosen = None
    for record in records[np.argsort(-counts, kind="stable")[:_RECORDS_TRIED]].tolist():
        held_by = np.zeros(shared.size, bool)
        held_by[positions[holders == record]] = True
        found = coverage(np.zeros(shared.size, np.int64), held_by, content, n, 1)
        if (found.fraction[0] >= con.min_coverage or found.longest[0] >= con.min_span) and \
                (chosen is None or found.covered[0] > chosen[1].covered[0]):
            chosen = (record, found, held_by)
    return chosen


_MARKED_WORDS = 120  # words of each text shown marked


def _marked(item: str, reference: str, grams: np.ndarray, n: int, numbers_as_one: bool) -> tuple[str, str]:
    """Both texts' normalized words with the words inside the n-grams they share (``grams``) in bold."""
    def marked(text: str) -> str:
        normalized = normalize([text])
        hashes, owners = word_hashes(normalized, numbers_as_one=numbers_as_one)
        at = np.flatnonzero(np.isin(ngram_hashes(hashes, owners, n, keep_short=False)[0], grams))
        covered = np.zeros(hashes.size, bool)
        for offset in range(n):
            covered[at + offset] = True
        words, out = normalized[0].decode().split()[:_MARKED_WORDS], []
        for k, w in enumerate(words):
            opens = covered[k] and (k == 0 or not covered[k - 1])
            closes = covered[k] and (k == len(words) - 1 or not covered[k + 1])
            out.append(("**" if opens else "") + w + ("**" if closes else ""))
        return " ".join(out) + (" ..." if hashes.size > _MARKED_WORDS else "")
    return marked(item), marked(reference)


def _longest_span(text: str, shared: np.ndarray, n: int) -> str:
    """The item's words (normalized) under its longest run of consecutive shared n-grams."""
    words = normalize([text])[0].decode().split()
    best, best_start, run = 0, 0, 0
    for k, hit in enumerate(shared.tolist()):
        run = run + 1 if hit else 0
        if run > best:
            best, best_start = run, k - run + 1
    return " ".join(words[best_start:best_start + best + n - 1]) if best else ""
