"""Near-duplicate detection: dstk's vectorised MinHash LSH against datasketch's per-record MinHash.

    python benchmarks/audit_near_duplicates.py                 # ~10k GSM8K records + 1M synthetic
    python benchmarks/audit_near_duplicates.py --records 200000 --datasketch-limit 50000

Two data sets, each with near-duplicate pairs planted at Jaccard 0.7, 0.8 and 0.9 (of 5-word
shingles after dstk's normalization):

* GSM8K (``../shared/data/gsm8k``: train and test, question and answer; generated paragraphs if
  absent) with copies whose last words are replaced until the true Jaccard is at the level (+0.02);
* ``--records`` synthetic short records (13 to 30 random words), pairs built to the exact level.

Both tools get the same normalized texts and the same shingles and run at the same threshold
(``--threshold``, default 0.7, so that every planted level should be found). datasketch runs with
its defaults (``MinHash()``: 128 permutations; ``MinHashLSH(threshold)``: its balanced band shape),
one record at a time (query, then insert), and its candidates are taken as found, as its users do;
dstk confirms candidates by their true Jaccard. Timing covers shingling, hashing, LSH and (for
dstk) normalization and verification, not reading files; on the ~10k set each tool's fastest of
``--repeat`` runs counts. Recall is the share of planted pairs reported; precision
the share of reported pairs whose true Jaccard is at or above the threshold. On the large set
datasketch runs on the first ``--datasketch-limit`` records (holding all planted pairs), since its
rate does not depend on the set's size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from data_checks import duplicates, normalize
from data_checks.scan import BATCH_SIZE, ScanPlan, featurize

LEVELS = (0.7, 0.8, 0.9)
SHINGLE = 5
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def shingle_set(text: str) -> set[str]:
    """5-word shingles of a normalized text (the whole text when shorter), as Python strings."""
    words = text.split()
    if len(words) < SHINGLE:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def gsm8k_set(pairs: int, rng: random.Random) -> tuple[list[str], dict[float, list[tuple[int, int]]]]:
    """GSM8K texts (normalized) plus planted copies, and the planted pairs per level."""
    if (GSM8K / "train.jsonl").exists():
        rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in open(GSM8K / name)]
        texts = [t.decode() for t in normalize.normalize([f"{r['question']}\n{r['answer']}" for r in rows])]
    else:
        texts = [" ".join(f"w{rng.randint(0, 20000)}" for _ in range(rng.randint(60, 160))) for _ in range(9000)]
    planted: dict[float, list[tuple[int, int]]] = {level: [] for level in LEVELS}
    bases = rng.sample(range(len(texts)), len(texts))
    for level in LEVELS:
        while len(planted[level]) < pairs:
            base = bases.pop()
            words = texts[base].split()
            for q in range(1, len(words) // 2):  # replace the last q words until Jaccard drops to the level
                copy = " ".join(words[:-q] + [f"zz{rng.randint(0, 10**9)}" for _ in range(q)])
                similarity = true_jaccard(texts[base], copy)
                if similarity < level:
                    break
                if similarity <= level + 0.02:
                    texts.append(copy)
                    planted[level].append((base, len(texts) - 1))
                    break
    return texts, planted


def synthetic_set(records: int, pairs: int, front: int, seed: int):
    """``records`` short random texts; planted pairs at exact levels, inside the first ``front``."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"t{i}" for i in range(50_000)])
    lengths = rng.integers(13, 31, size=records)
    words = vocabulary[rng.integers(0, vocabulary.size, size=(records, 30))]
    texts = [" ".join(row[:n]) for row, n in zip(words, lengths)]
    # Jaccard (m - q) / (m + q) for m shingles with the last q words replaced: 0.9 = 19 shingles and
    # 1 word, 0.8 = 9 and 1, 0.7 = 17 and 3.
    shapes = {0.9: (19, 1), 0.8: (9, 1), 0.7: (17, 3)}
    slots = rng.choice(min(front, records), size=2 * pairs * len(LEVELS), replace=False)
    planted: dict[float, list[tuple[int, int]]] = {level: [] for level in LEVELS}
    for k, level in enumerate(np.repeat(LEVELS, pairs)):
        m, q = shapes[float(level)]
        base = vocabulary[rng.integers(0, vocabulary.size, size=m + SHINGLE - 1)].tolist()
        copy = base[:-q] + [f"zz{k}x{j}" for j in range(q)]
        a, b = sorted(slots[2 * k:2 * k + 2].tolist())
        texts[a], texts[b] = " ".join(base), " ".join(copy)
        planted[float(level)].append((a, b))
    return texts, planted


def run_dstk(texts: list[str], threshold: float, workers: int) -> set[tuple[int, int]]:
    """dstk's audit path: featurize in batches (optionally in processes), LSH, true-Jaccard check."""
    plan = ScanPlan(minhasher=duplicates.MinHasher(threshold, 128), shingle_words=SHINGLE)
    batches = [texts[i:i + BATCH_SIZE] for i in range(0, len(texts), BATCH_SIZE)]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            features = list(pool.map(featurize, batches, batches, [None] * len(batches), [plan] * len(batches)))
    else:
        features = [featurize(b, b, None, plan) for b in batches]
    digests = np.concatenate([f["digests"] for f in features])
    keys = np.concatenate([f["bands"] for f in features])
    shingles = np.concatenate([f["shingles"] for f in features])
    offsets = np.r_[0, np.cumsum(np.concatenate([f["shingle_counts"] for f in features]))]
    empty = np.concatenate([f["empty"] for f in features])
    _, representatives = duplicates.exact_groups(digests, np.flatnonzero(~empty))
    left, right = duplicates.candidate_pairs(keys, representatives)
    similarity = duplicates.jaccard(left, right, offsets, shingles)
    keep = similarity >= threshold - 1e-12
    return set(zip(left[keep].tolist(), right[keep].tolist()))


def run_datasketch(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    """datasketch with its defaults, one record at a time: query the index, then insert."""
    lsh = MinHashLSH(threshold=threshold)
    found = set()
    for i, text in enumerate(texts):
        signature = MinHash()
        signature.update_batch([s.encode() for s in shingle_set(text)])
        found.update((j, i) for j in lsh.query(signature))
        lsh.insert(i, signature)
    return found


def measure(name: str, tool: str, texts: list[str], planted, threshold: float, run, repeat: int = 1) -> dict:
    """Run a tool ``repeat`` times; its time is the fastest run (as timeit does), on a shared machine."""
    seconds = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        found = run()
        seconds = min(seconds, time.perf_counter() - start)
    recall = {level: sum((min(a, b), max(a, b)) in found for a, b in pairs) / len(pairs)
              for level, pairs in planted.items()}
    good = sum(true_jaccard(texts[a], texts[b]) >= threshold - 1e-12 for a, b in found)
    return {"set": name, "tool": tool, "records": len(texts), "seconds": seconds,
            "rate": len(texts) / seconds, "recall": recall, "precision": good / len(found) if found else 1.0,
            "reported": len(found)}


def print_table(rows: list[dict], threshold: float) -> None:
    print(f"\nnear duplicates at threshold {threshold} (5-word shingles, 128 permutations)")
    header = f"{'set':<24}{'tool':<22}{'records':>10}{'rec/s':>11}" + "".join(
        f"{'recall@' + str(level):>12}" for level in LEVELS) + f"{'precision':>11}{'pairs':>8}"
    print(header)
    for r in rows:
        print(f"{r['set']:<24}{r['tool']:<22}{r['records']:>10,}{r['rate']:>11,.0f}"
              + "".join(f"{r['recall'][level]:>12.3f}" for level in LEVELS)
              + f"{r['precision']:>11.3f}{r['reported']:>8}")
    for name in dict.fromkeys(r["set"] for r in rows):
        base = next((r for r in rows if r["set"] == name and r["tool"].startswith("datasketch")), None)
        for r in rows:
            if base and r["set"] == name and r["tool"].startswith("dstk"):
                print(f"{name}: {r['tool']} is {r['rate'] / base['rate']:.1f}x datasketch's records/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="synthetic records (0 skips the set)")
    parser.add_argument("--datasketch-limit", type=int, default=100_000,
                        help="datasketch runs on this many synthetic records (0: all)")
    parser.add_argument("--pairs", type=int, default=300, help="planted pairs per level")
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool on the ~10k set; the fastest counts")
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    texts, planted = gsm8k_set(args.pairs, rng)
    name = "gsm8k+planted" if (GSM8K / "train.jsonl").exists() else "generated+planted"
    rows.append(measure(name, "dstk (1 process)", texts, planted, args.threshold,
                        lambda: run_dstk(texts, args.threshold, 1), args.repeat))
    rows.append(measure(name, "datasketch", texts, planted, args.threshold,
                        lambda: run_datasketch(texts, args.threshold), args.repeat))
    if args.records:
        limit = args.datasketch_limit or args.records
        texts, planted = synthetic_set(args.records, args.pairs, limit, seed=1)
        texts = [t.decode() for t in normalize.normalize(texts)]
        name = f"synthetic {args.records:,}"
        rows.append(measure(name, "dstk (1 process)", texts, planted, args.threshold,
                            lambda: run_dstk(texts, args.threshold, 1)))
        if args.workers > 1:
            rows.append(measure(name, f"dstk ({args.workers} processes)", texts, planted, args.threshold,
                                lambda: run_dstk(texts, args.threshold, args.workers)))
        front = texts[:limit]
        rows.append(measure(name, f"datasketch (first {limit:,})", front, planted, args.threshold,
                            lambda: run_datasketch(front, args.threshold)))
    print_table(rows, args.threshold)


if __name__ == "__main__":
    main()
