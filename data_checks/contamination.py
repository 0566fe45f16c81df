"""N-gram contamination: how much of each eval or benchmark item appears in the reference data.

An item (its prompt, user turns or text) is contaminated when at least ``min_overlap`` of its
distinct word n-grams (13 by default, as in GPT-3 and lm-eval's decontamination) occur anywhere in
the reference set's records. The item side is small, so its n-grams form a sorted vocabulary that the
reference set (train, or eval for benchmarks) is streamed against: memory grows with the held-out
sets, not with the training data.

Template boilerplate is left out: an n-gram found in many items of one set (a shared instruction
preamble) says nothing about a particular item, and would otherwise mark every item contaminated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_checks.policy import AuditPolicy
from data_checks.report import Finding, excerpt
from data_checks.scan import SplitScan

# Which sets each reference set is checked against: train contaminating eval or a benchmark is
# leakage; eval containing benchmark items means selecting checkpoints on the benchmark.
TARGETS = {"train": ("eval", "benchmark"), "eval": ("benchmark",), "benchmark": ()}
_REFERENCE_RECORDS_LISTED = 50  # per finding; the evidence gives the total
_BOILERPLATE_MIN_ITEMS = 3


@dataclass
class ItemGrams:
    """One held-out set's item n-grams, boilerplate removed."""

    scan: SplitScan
    grams: np.ndarray  # uint64 n-gram hash per (item, n-gram) pair
    items: np.ndarray  # item position of each pair, non-decreasing


def item_grams(scan: SplitScan, boilerplate_fraction: float) -> ItemGrams:
    """Drop boilerplate n-grams from a held-out set's items.

    Args:
        scan: A scan of the set with ``held`` n-grams.
        boilerplate_fraction: Fraction of items (and at least 3) an n-gram must appear in to be
            boilerplate.
    """
    grams, items = scan.held
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    limit = max(_BOILERPLATE_MIN_ITEMS, math.ceil(boilerplate_fraction * np.unique(items).size))
    keep = counts[inverse] < limit  # items hold each n-gram once, so counts are items
    return ItemGrams(scan, grams[keep], items[keep])


def vocabulary(sets: list[ItemGrams]) -> np.ndarray:
    """The sorted distinct n-grams of several held-out sets: what a reference pass looks up."""
    if not sets:
        return np.zeros(0, np.uint64)
    return np.unique(np.concatenate([s.grams for s in sets]))


def findings(held: ItemGrams, reference: SplitScan, ngram: int, policy: AuditPolicy) -> list[Finding]:
    """Contamination findings of one held-out set by one reference set.

    Args:
        held: The held-out set's item n-grams.
        reference: The reference scan, whose ``reference_hits`` index into its ``vocabulary``.
        ngram: Words per n-gram.
        policy: Threshold and severities.

    Returns:
        One finding per contaminated item, naming the item and the reference records.
    """
    severity = policy.severity_between({held.scan.source.role, reference.source.role})
    hit_index, hit_records = reference.reference_hits
    if severity is None or held.items.size == 0 or hit_index.size == 0:
        return []
    order = np.argsort(hit_index, kind="stable")
    hit_index, hit_records = hit_index[order], hit_records[order]
    gram_index = np.searchsorted(reference.vocabulary, held.grams)
    matched = np.isin(gram_index, hit_index)
    total = np.bincount(held.items, minlength=len(held.scan.source))
    found = np.bincount(held.items[matched], minlength=len(held.scan.source))
    overlap = found / np.maximum(total, 1)
    contaminated = np.flatnonzero((total > 0) & (overlap >= policy.contamination.min_overlap))
    out = []
    item_source, ref_source = held.scan.source, reference.source
    # held.items is non-decreasing (reading order), so each item's pairs are one slice.
    starts = np.searchsorted(held.items, contaminated)
    ends = np.searchsorted(held.items, contaminated, side="right")
    texts = item_source.texts(contaminated, view="prompt")
    for item, start, end, text in zip(contaminated.tolist(), starts, ends, texts):
        grams = np.unique(gram_index[start:end][matched[start:end]])
        lo, hi = np.searchsorted(hit_index, grams), np.searchsorted(hit_index, grams, side="right")
        records = np.unique(np.concatenate([hit_records[a:b] for a, b in zip(lo, hi)]))
        listed = records[:_REFERENCE_RECORDS_LISTED]
        out.append(Finding(
            check="ngram_contamination",
            severity=severity,
            message=f"{item_source.name}[{item_source.row_of(item)}]: {overlap[item]:.0%} of its {ngram}-grams "
                    f"occur in {ref_source.name} ({records.size} records)",
            records=[{"split": item_source.name, "index": item_source.row_of(item)}]
            + [{"split": ref_source.name, "index": ref_source.row_of(r)} for r in listed.tolist()],
            evidence={"overlap": round(float(overlap[item]), 4), "ngram": ngram,
                      "matched_ngrams": int(found[item]), "item_ngrams": int(total[item]),
                      "reference_records": int(records.size), "item_text": excerpt(text)},
        ))
    return out
