"""Exact and near duplicates.

Exact duplicates are records whose normalized texts are equal (128-bit content hashes). Near
duplicates are found among the distinct texts in three vectorised steps, with no per-record Python
object: MinHash signatures of each record's word shingles, LSH banding for candidate pairs, and the
true Jaccard similarity of each candidate's shingle sets, so that every reported pair really is at or
above the threshold (precision 1 by construction).

The band shape is chosen for recall, not balance: a pair exactly at the threshold becomes a candidate
with probability >= :data:`TARGET_RECALL`. (datasketch's default shape weighs false positives and
negatives equally, and at threshold 0.9 with 128 permutations finds a 0.9 pair only 31% of the time.)
False candidates cost only verification time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from data_checks.normalize import mix64, unique_per_owner
from data_checks.policy import AuditPolicy
from data_checks.report import Finding, excerpt

if TYPE_CHECKING:  # scan imports this module for MinHasher
    from data_checks.scan import SplitScan

TARGET_RECALL = 0.99
_U64 = np.uint64
_PAIRS_LISTED = 20  # per near-duplicate finding; the evidence gives the total
_CHUNK = 1 << 15  # shingles per MinHash block: 32k x 128 permutations x 4 bytes = 16 MiB


def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands and rows per band for a threshold.

    Two sets of Jaccard similarity ``s`` share at least one band with probability
    ``1 - (1 - s**rows)**bands``. The most rows (fewest false candidates) that keep that probability
    >= :data:`TARGET_RECALL` at the threshold win.

    Args:
        threshold: Jaccard similarity to detect.
        num_perm: MinHash permutations available.

    Returns:
        ``(bands, rows)`` with ``bands * rows <= num_perm``.
    """
    for rows in range(num_perm, 1, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= TARGET_RECALL:
            return bands, rows
    return num_perm, 1


class MinHasher:
    """MinHash with multiply-shift hash functions, and the LSH band keys of the signatures."""

    def __init__(self, threshold: float, num_perm: int, seed: int = 1):
        self.bands, self.rows = lsh_shape(threshold, num_perm)
        rng = np.random.default_rng(seed)
        # h_i(x) = a_i * x + b_i mod 2**32, a_i odd, on the high 32 bits of the (well-mixed) shingle
        # hash: each h_i permutes the 32-bit values, and uint32 arithmetic is ~2x faster than uint64
        # in numpy. Signature agreement estimates Jaccard without measurable bias (tests check recall).
        used = self.bands * self.rows
        self._multipliers = rng.integers(0, 2**32, size=(used, 1), dtype=np.uint32) | np.uint32(1)
        self._increments = rng.integers(0, 2**32, size=(used, 1), dtype=np.uint32)
        self._row_weights = rng.integers(1, 2**63, size=self.rows, dtype=_U64) | _U64(1)

    def band_keys(self, shingles: np.ndarray, owners: np.ndarray, count: int) -> np.ndarray:
        """LSH band keys of ``count`` records.

        Args:
            shingles: Shingle hashes, grouped by owner.
            owners: The record (0 to ``count - 1``) of each shingle, non-decreasing.
            count: Records in the batch.

        Returns:
            ``(count, bands)`` uint64 keys; rows of records without shingles are 0 and must not be
            compared.
        """
        keys = np.zeros((count, self.bands), dtype=_U64)
        if shingles.size == 0:
            return keys
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        bounds = np.r_[starts, shingles.size]
        # Cut blocks at record boundaries so that each record's minimum is taken in one block.
        cuts = np.unique(np.r_[np.searchsorted(starts, np.arange(0, shingles.size, _CHUNK)), starts.size])
        for first, last in zip(cuts[:-1], cuts[1:]):
            lo, hi = bounds[first], bounds[last]
            # (permutations, shingles): each record's shingles are contiguous along axis 1, where
            # reduceat is ~5x faster than along axis 0.
            hashed = self._multipliers * (shingles[lo:hi] >> _U64(32)).astype(np.uint32)
            hashed += self._increments
            signature = np.minimum.reduceat(hashed, starts[first:last] - lo, axis=1).T
            banded = signature.reshape(-1, self.bands, self.rows).astype(_U64) * self._row_weights
            keys[owners[starts[first:last]]] = mix64(banded.sum(axis=2, dtype=_U64))
        return keys


def exact_groups(digests: np.ndarray, eligible: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Group records with equal content hashes.

    Args:
        digests: ``(n, 2)`` content hashes of all records.
        eligible: Indices of the records to group (non-empty texts).

    Returns:
        ``(groups, representatives)``: each group of two or more record indices, ascending; and one
        record per distinct text, the first of its group.
    """
    order = eligible[np.lexsort((digests[eligible, 1], digests[eligible, 0]))]
    sorted_digests = digests[order]
    new = np.r_[True, np.any(sorted_digests[1:] != sorted_digests[:-1], axis=1)]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, order.size])
    groups = [np.sort(order[s:s + n]) for s, n in zip(starts[sizes > 1], sizes[sizes > 1])]
    representatives = np.minimum.reduceat(order, starts) if order.size else order
    return groups, np.sort(representatives)


def candidate_pairs(keys: np.ndarray, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of records that share a band key.

    In a bucket of ``m`` records every record is paired with the bucket's first and with its
    predecessor: all pairs for ``m <= 3``, ``2m`` pairs for larger buckets (a template shared by
    thousands of records would otherwise give millions). Near-duplicate clusters still come out
    whole, because they are joined through the first member.

    Args:
        keys: ``(n, bands)`` band keys of all records.
        records: The records to pair up.

    Returns:
        ``(left, right)`` record indices, ``left < right``, each pair once.
    """
    codes = []
    n = np.int64(keys.shape[0])
    for band in range(keys.shape[1]):
        order = records[np.argsort(keys[records, band])]
        same = keys[order[1:], band] == keys[order[:-1], band]
        if not same.any():
            continue
        position = np.arange(order.size)
        first = np.maximum.accumulate(np.where(np.r_[True, ~same], position, 0))
        member = position[1:][same]
        for a, b in ((order[first[member]], order[member]), (order[member - 1], order[member])):
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    if not codes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    unique = np.unique(np.concatenate(codes))
    return unique // n, unique % n


def jaccard(left: np.ndarray, right: np.ndarray, offsets: np.ndarray, shingles: np.ndarray) -> np.ndarray:
    """True Jaccard similarity of pairs of records' shingle sets.

    Args:
        left, right: Record indices of each pair.
        offsets: ``(n + 1,)`` start of each record's shingles in ``shingles``.
        shingles: Shingle hashes of every record, record by record; repeats within a record are
            ignored (the sets are compared).

    Returns:
        Similarity per pair, as float64.
    """
    result = np.zeros(left.size)
    if left.size == 0:
        return result
    sizes = np.diff(offsets)
    cumulative = np.cumsum(sizes[left] + sizes[right])
    block = 1 << 22  # shingles gathered per step: about 100 MiB of temporaries
    cuts = np.searchsorted(cumulative, np.arange(block, cumulative[-1], block))
    bounds = np.unique(np.r_[0, cuts, left.size])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        values_a, pair_a = unique_per_owner(*_gather(offsets, shingles, left[lo:hi]))
        values_b, pair_b = unique_per_owner(*_gather(offsets, shingles, right[lo:hi]))
        # Both sides are sets now, so a (pair, value) key found on both sides is one shared shingle.
        shared = np.isin(_pair_keys(values_a, pair_a), _pair_keys(values_b, pair_b))
        inter = np.bincount(pair_a[shared], minlength=hi - lo)
        union = np.bincount(pair_a, minlength=hi - lo) + np.bincount(pair_b, minlength=hi - lo) - inter
        result[lo:hi] = inter / np.maximum(union, 1)
    return result


def clusters(left: np.ndarray, right: np.ndarray) -> list[np.ndarray]:
    """Connected components of the graph of pairs, each as ascending record indices."""
    if left.size == 0:
        return []
    nodes, inverse = np.unique(np.r_[left, right], return_inverse=True)
    a, b = inverse[:left.size], inverse[left.size:]
    label = np.arange(nodes.size)
    while True:  # min-label propagation with pointer jumping: label[x] <= x throughout
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    order = np.argsort(label, kind="stable")
    splits = np.flatnonzero(np.diff(label[order])) + 1
    return [nodes[group] for group in np.split(order, splits)]


def _pair_keys(values: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """One 64-bit key per (pair, value), so one isin compares every pair at once."""
    return mix64(values ^ (pairs.astype(_U64) * _U64(0x9E3779B97F4A7C15)))


def _gather(offsets: np.ndarray, values: np.ndarray, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of several records, concatenated, with the position of each one's record."""
    starts, sizes = offsets[records], offsets[records + 1] - offsets[records]
    owner = np.repeat(np.arange(records.size), sizes)
    within = np.arange(owner.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return values[starts[owner] + within], owner


def findings(scans: list[SplitScan], policy: AuditPolicy) -> list[Finding]:
    """Exact and near duplicate findings across all scanned sets.

    Args:
        scans: Every set's scan, with global ``offset``s; near duplicates need their band keys.
        policy: Thresholds and severities (train with held-out data: leakage; inside one set, or eval
            with a benchmark: overlap; benchmarks among themselves: not reported).

    Returns:
        One finding per group of exact copies and per cluster of near duplicates.
    """
    located = _Locator(scans)
    digests = np.concatenate([s.digests for s in scans])
    eligible = np.flatnonzero(~np.concatenate([s.empty for s in scans]))
    groups, representatives = exact_groups(digests, eligible)
    out = []
    texts = located.texts([g[0] for g in groups])
    for group, text in zip(groups, texts):
        severity = policy.severity_between(located.roles(group))
        if severity is not None:
            out.append(Finding(
                check="exact_duplicate", severity=severity,
                message=f"{group.size} records have the same text after normalization: {located.names(group)}",
                records=located.records(group), evidence={"copies": int(group.size), "text": excerpt(text)}))
    if policy.duplicates.near and scans[0].bands is not None:
        out += _near_findings(scans, located, groups, representatives, policy)
    return out


def _near_findings(scans, located, groups, representatives, policy: AuditPolicy) -> list[Finding]:
    bands = np.concatenate([s.bands for s in scans])
    shingles = np.concatenate([s.shingles for s in scans])
    sizes = np.concatenate([np.diff(s.shingle_offsets) for s in scans])
    offsets = np.r_[0, np.cumsum(sizes)]
    left, right = candidate_pairs(bands, representatives)
    similarity = jaccard(left, right, offsets, shingles)
    keep = similarity >= policy.duplicates.threshold - 1e-12  # float division of integer counts
    left, right, similarity = left[keep], right[keep], similarity[keep]
    copies = {int(g[0]): g for g in groups}  # a representative stands for its exact copies
    found = clusters(left, right)
    if not found:
        return []
    # Each pair's cluster, so that a cluster's pairs are one slice of the pairs sorted by cluster.
    nodes = np.concatenate(found)
    node_order = np.argsort(nodes)
    labels = np.repeat(np.arange(len(found)), [c.size for c in found])[node_order]
    pair_label = labels[np.searchsorted(nodes[node_order], left)]
    pair_order = np.argsort(pair_label, kind="stable")
    bounds = np.searchsorted(pair_label[pair_order], np.arange(len(found) + 1))
    out = []
    for label, cluster in enumerate(found):
        members = np.unique(np.concatenate([copies.get(int(r), np.array([r])) for r in cluster]))
        severity = policy.severity_between(located.roles(members))
        if severity is None:
            continue
        inside = pair_order[bounds[label]:bounds[label + 1]]
        listed = inside[:_PAIRS_LISTED]
        texts = iter(excerpt(t) for t in located.texts(np.stack([left[listed], right[listed]], axis=1).ravel()))
        pairs = [{"a": located.record(a), "b": located.record(b), "jaccard": round(float(j), 4)}
                 for a, b, j in zip(left[inside], right[inside], similarity[inside])]
        for pair in pairs[:_PAIRS_LISTED]:  # the two texts, for the report to show side by side
            pair["a_text"], pair["b_text"] = next(texts), next(texts)
        scores = similarity[inside]
        out.append(Finding(
            check="near_duplicate", severity=severity,
            message=f"{members.size} records are near duplicates (Jaccard {scores.min():.2f} to "
                    f"{scores.max():.2f}): {located.names(members)}",
            records=located.records(members),
            evidence={"min_jaccard": round(float(scores.min()), 4), "max_jaccard": round(float(scores.max()), 4),
                      "pairs": pairs[:_PAIRS_LISTED], "pairs_total": len(pairs),
                      "shingle_words": policy.duplicates.shingle_words}))
    return out


class _Locator:
    """Global record ids (across all sets) to sets, file rows, roles and texts."""

    def __init__(self, scans):
        self.scans = scans
        self.starts = np.array([s.offset for s in scans])

    def _split(self, ids) -> np.ndarray:
        return np.searchsorted(self.starts, ids, side="right") - 1

    def record(self, gid: int) -> dict:
        scan = self.scans[int(self._split(gid))]
        return {"split": scan.source.name, "index": scan.source.row_of(int(gid) - scan.offset)}

    def records(self, ids) -> list[dict]:
        return [self.record(i) for i in np.asarray(ids).tolist()]

    def roles(self, ids) -> set[str]:
        return {self.scans[s].source.role for s in np.unique(self._split(ids)).tolist()}

    def names(self, ids, limit: int = 4) -> str:
        shown = ", ".join(f"{r['split']}[{r['index']}]" for r in self.records(np.asarray(ids)[:limit]))
        return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")

    def texts(self, ids) -> list[str]:
        """Full texts of records, fetched one set at a time."""
        ids = np.asarray(ids, dtype=np.int64)
        out = [""] * ids.size
        splits = self._split(ids)
        for index in np.unique(splits).tolist():
            where = np.flatnonzero(splits == index)
            scan = self.scans[index]
            for position, text in zip(where, scan.source.texts(ids[where] - scan.offset)):
                out[position] = text
        return out
