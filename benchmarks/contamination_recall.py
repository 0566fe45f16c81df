"""Contamination that hides: recall of dstk's audit on disguised test items, beside datasketch.

    python benchmarks/contamination_recall.py                    # GSM8K, ~8.8k records
    python benchmarks/contamination_recall.py --records 1000000  # the training set padded to 1M records

GSM8K's test questions (``../shared/data/gsm8k``; generated GSM8K-like questions if absent) are the
eval set; --per-disguise of them are planted into GSM8K's training set in each disguise:

    verbatim     the question as it is
    surface      case, spacing and punctuation changed
    edit5        about one word in twenty replaced or dropped
    edit10       about one word in ten replaced or dropped
    numbers      every number swapped for another
    reorder      the sentences in another order
    wrapped      inside a longer prompt ("Homework: ... Show your work.")
    paraphrase   about one word in five swapped for a synonym (a small table), one in ten edited

dstk's audit runs with its default contamination policy and no other check (the duplicate checks
find no disguised copy that contamination misses, and cost their own time); an eval item counts as
found when a finding names it and a training record. datasketch's MinHash LSH (128 permutations, threshold 0.5, 5-word shingles after dstk's
normalization) indexes the training prompts and is queried with each eval item, as its users
decontaminate. The table gives recall per disguise, the share of untouched eval items flagged, the
share of untouched training records named in a finding, and records per second (training and eval
records over the seconds of the check, reading files included for dstk).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scratch import add_keep_flag, scratch  # noqa: E402  (the checkout first on the path)

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
DISGUISES = ("verbatim", "surface", "edit5", "edit10", "numbers", "reorder", "wrapped", "paraphrase")
SYNONYMS = {
    "buys": "purchases", "bought": "purchased", "has": "owns", "had": "owned", "gets": "receives",
    "gave": "handed", "gives": "hands", "makes": "produces", "made": "produced", "each": "every",
    "total": "overall", "many": "numerous", "much": "a lot", "spends": "uses", "spent": "used",
    "friends": "pals", "money": "cash", "costs": "is priced at", "cost": "price", "day": "daily period",
    "week": "seven days", "pays": "gives", "paid": "gave", "sells": "trades", "sold": "traded",
    "wants": "would like", "needs": "requires", "store": "shop", "house": "home", "car": "vehicle",
    "children": "kids", "school": "academy", "book": "volume", "books": "volumes", "big": "large",
    "small": "little", "half": "one half", "twice": "two times", "more": "additional", "left": "remaining",
    "takes": "needs", "started": "began", "starts": "begins", "finished": "completed", "works": "labors",
    "hours": "hrs", "minutes": "mins", "dollars": "bucks", "rest": "remainder", "together": "combined",
}
FILLER = ("the of and to in is it that for was on are with as his they at be this from have or by one "
          "had not but what all were when we there can an your which their said if do will each about").split()


def load() -> tuple[list[dict], list[dict]]:
    """GSM8K (train, test) as instruction records, or generated GSM8K-like ones."""
    if not GSM8K.is_dir():
        return generated(7473, 1319)

    def read(name):
        rows = [json.loads(line) for line in (GSM8K / name).read_text().splitlines() if line.strip()]
        return [{"prompt": r["question"], "response": r["answer"]} for r in rows]
    return read("train.jsonl"), read("test.jsonl")


def generated(train: int, test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """GSM8K-like questions: 3-5 sentences of common words, each with a number, under the same
    instruction and question boilerplate; different questions share that boilerplate only."""
    rng = random.Random(seed)

    def question():
        def word():  # words the synonym table knows about as often as in GSM8K (~15%)
            return rng.choice(list(SYNONYMS) if rng.random() < 0.15 else FILLER)
        sentences = [" ".join(word() for _ in range(rng.randint(8, 16)))
                     + f" {rng.randint(2, 500)}." for _ in range(rng.randint(3, 5))]
        return "Solve the problem and give a number. " + " ".join(s.capitalize() for s in sentences) \
            + " How many are left in the end?"
    rows = [{"prompt": question(), "response": f"#### {i}"} for i in range(train + test)]
    return rows[:train], rows[train:]


def disguise(text: str, how: str, rng: random.Random) -> str:
    words = text.split()

    def edit(rate: float, ws: list[str]) -> list[str]:
        out = []
        for w in ws:
            roll = rng.random()
            if roll < rate / 2:
                continue  # dropped
            out.append(rng.choice(FILLER) if roll < rate else w)
        return out

    if how == "verbatim":
        return text
    if how == "surface":
        return "  ".join(w.upper() if rng.random() < 0.3 else w.lower() for w in re.sub(r"[,.?!$']", " ; ", text).split())
    if how in ("edit5", "edit10"):
        return " ".join(edit(0.05 if how == "edit5" else 0.10, words))
    if how == "numbers":
        return re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), text)
    if how == "reorder":
        sentences = re.split(r"(?<=[.?!])\s+", text)
        rest, last = sentences[:-1], sentences[-1:]  # the question stays at the end
        for _ in range(5):
            rng.shuffle(rest)
            if len(rest) < 2 or rest != sentences[:-1]:
                break
        return " ".join(rest + last)
    if how == "wrapped":
        return f"Homework for Tuesday, chapter {rng.randint(1, 9)}: {text} Show your work and explain each step."
    if how == "paraphrase":
        swapped = [SYNONYMS.get(w.lower(), w) if rng.random() < 0.8 else w for w in words]
        return " ".join(edit(0.10, swapped))
    raise ValueError(how)


def plant(train: list[dict], test: list[dict], per: int, seed: int) -> tuple[list[dict], dict[int, str]]:
    """Training records with ``per`` test questions planted in each disguise; eval index -> disguise."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(test)), per * len(DISGUISES))
    planted = {item: DISGUISES[i // per] for i, item in enumerate(chosen)}
    rows = list(train) + [{"prompt": disguise(test[item]["prompt"], how, rng), "response": test[item]["response"]}
                          for item, how in planted.items()]
    return rows, planted


def padded(rows: list[dict], records: int, seed: int) -> list[dict]:
    """``rows`` and shuffled-word variants of them up to ``records`` (planted rows stay as they are)."""
    rng = random.Random(seed)
    out = list(rows)
    while len(out) < records:
        base = rows[rng.randrange(len(rows))]
        words = base["prompt"].split()
        rng.shuffle(words)
        out.append({"prompt": " ".join(words), "response": base["response"]})
    return out


def run_dstk(train_file: Path, eval_file: Path, planted_train: set[int], contamination: dict,
             ) -> tuple[set[int], set[int], float]:
    """(eval items found, untouched training records named, seconds)."""
    from data_checks import AuditPolicy, audit

    policy = AuditPolicy(pii={"enabled": False}, quality={"enabled": False}, poisoning={"enabled": False},
                         duplicates={"enabled": False}, contamination=contamination)
    start = time.perf_counter()
    report = audit(str(train_file), str(eval_file), policy=policy)
    seconds = time.perf_counter() - start
    found, named = set(), set()
    for finding in report.findings:
        if finding.check != "ngram_contamination":
            continue
        splits = {r["split"] for r in finding.records}
        if {"train", "eval"} <= splits:
            found |= {r["index"] for r in finding.records if r["split"] == "eval"}
            named |= {r["index"] for r in finding.records if r["split"] == "train"} - planted_train
    return found, named, seconds


def run_datasketch(train: list[dict], test: list[dict], threshold: float) -> tuple[set[int], float]:
    """(eval items with an LSH candidate in train, seconds): MinHash of 5-word shingles of the
    normalized prompts, 128 permutations."""
    from datasketch import MinHash, MinHashLSH

    from data_checks.normalize import normalize

    def minhash(text: bytes) -> MinHash:
        words = text.split()
        m = MinHash(num_perm=128)
        m.update_batch([b" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))])
        return m

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    for i, text in enumerate(normalize([r["prompt"] for r in train])):
        lsh.insert(i, minhash(text))
    found = {i for i, text in enumerate(normalize([r["prompt"] for r in test])) if lsh.query(minhash(text))}
    return found, time.perf_counter() - start


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-disguise", type=int, default=100, help="test questions planted per disguise")
    parser.add_argument("--records", type=int, default=0, help="pad the training set to this many records")
    parser.add_argument("--threshold", type=float, default=0.5, help="datasketch's LSH threshold")
    parser.add_argument("--datasketch-limit", type=int, default=200_000,
                        help="datasketch indexes at most this many training records (its rate does not depend on size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ngram", type=int, help="audit.contamination.ngram (default: the policy's)")
    parser.add_argument("--min-coverage", type=float, help="audit.contamination.min_coverage (default: the policy's)")
    add_keep_flag(parser, "the data files")
    args = parser.parse_args()
    train, test = load()
    if args.per_disguise * len(DISGUISES) > len(test):
        parser.error(f"--per-disguise x {len(DISGUISES)} disguises must leave clean test items ({len(test)} in all)")
    rows, planted = plant(train, test, args.per_disguise, args.seed)
    planted_rows = set(range(len(train), len(rows)))
    rows = padded(rows, args.records, args.seed) if args.records > len(rows) else rows
    source = "GSM8K" if GSM8K.is_dir() else "generated GSM8K-like questions"
    print(f"{len(rows):,} training records ({len(planted_rows)} planted), {len(test)} eval items, {source}", flush=True)
    with scratch("dstk-contamination-", args.keep) as work:
        found, named, seconds = run_dstk(write_jsonl(work / "train.jsonl", rows), write_jsonl(work / "eval.jsonl", test),
                                         planted_rows, {k: v for k, v in (("ngram", args.ngram),
                                                         ("min_coverage", args.min_coverage)) if v is not None})
    # datasketch gets the planted rows and the first training records up to its limit
    sketch_rows = [rows[i] for i in sorted(planted_rows)] + rows[:max(0, args.datasketch_limit - len(planted_rows))]
    sketch_found, sketch_seconds = run_datasketch(sketch_rows, test, args.threshold)
    clean = [i for i in range(len(test)) if i not in planted]
    print("\n| disguise | dstk recall | datasketch recall |\n|---|---|---|")
    for how in DISGUISES:
        items = [i for i, h in planted.items() if h == how]
        print(f"| {how} | {sum(i in found for i in items) / len(items):.2f} | "
              f"{sum(i in sketch_found for i in items) / len(items):.2f} |")
    print(f"| untouched eval items flagged | {sum(i in found for i in clean) / len(clean):.2%} | "
          f"{sum(i in sketch_found for i in clean) / len(clean):.2%} |")
    untouched = len(rows) - len(planted_rows)
    print(f"| untouched training records named | {len(named) / untouched:.3%} | - |")
    dstk_rate, sketch_rate = (len(rows) + len(test)) / seconds, (len(sketch_rows) + len(test)) / sketch_seconds
    print(f"| records/s | {dstk_rate:,.0f} | {sketch_rate:,.0f} |")
    print(f"\ndstk / datasketch records/s: {dstk_rate / sketch_rate:.1f}x (goal >= 10x on 1M records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
