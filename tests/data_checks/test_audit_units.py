"""The parts: normalization, MinHash LSH and Jaccard, PII validators, licenses, processes, imports."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from audit_data import write_jsonl

from data_checks import AuditPolicy, audit, duplicates, normalize, pii, scan
from data_checks.manifest import _license_problem


def test_normalization_folds_unicode_case_punctuation_and_whitespace():
    texts = ["  Ｈｅｌｌｏ,\tWORLD_wide!! ", "Straße", "", "Été—x\x00y"]
    assert normalize.normalize(texts) == [b"hello world wide", b"strasse", b"", "été x y".encode()]


def test_word_hashes_do_not_depend_on_position():
    hashes, owners = normalize.word_hashes([b"alpha beta", b"beta", b"betb"])
    assert (hashes[1] == hashes[2], hashes[2] == hashes[3], owners.tolist()) == (True, False, [0, 0, 1, 2])


def test_short_texts_get_one_shingle_only_when_asked():
    hashes, owners = normalize.word_hashes([b"a b", b"a b c d e f"])
    kept = normalize.ngram_hashes(hashes, owners, 5, keep_short=True)[1].tolist()
    skipped = normalize.ngram_hashes(hashes, owners, 5, keep_short=False)[1].tolist()
    assert (kept, skipped) == ([0, 1, 1], [1, 1])


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_lsh_shape_finds_pairs_at_the_threshold_with_high_probability(threshold):
    bands, rows = duplicates.lsh_shape(threshold, 128)
    assert bands * rows <= 128 and 1 - (1 - threshold**rows) ** bands >= duplicates.TARGET_RECALL


def test_jaccard_matches_python_sets_and_ignores_repeats():
    rng = np.random.default_rng(0)
    sets = [rng.integers(0, 60, size=rng.integers(1, 40)).astype(np.uint64) for _ in range(50)]
    offsets = np.r_[0, np.cumsum([s.size for s in sets])]
    left, right = rng.integers(0, 50, 200), rng.integers(0, 50, 200)
    expected = [len(set(sets[a].tolist()) & set(sets[b].tolist())) / len(set(sets[a].tolist()) | set(sets[b].tolist()))
                for a, b in zip(left, right)]
    assert np.allclose(duplicates.jaccard(left, right, offsets, np.concatenate(sets)), expected)


def test_clusters_join_chained_pairs():
    found = duplicates.clusters(np.array([1, 2, 7, 9]), np.array([2, 3, 8, 1]))
    assert [c.tolist() for c in found] == [[1, 2, 3, 9], [7, 8]]


@pytest.mark.parametrize("text", [
    "What is 123-456-7890 minus 5?",  # arithmetic, not a phone number
    "<<6000-600-150-1200-2000=2050>>", "Version 1.2.3 shipped at 12:30:45 on 2023-01-05.",
    "Card 4111 1111 1111 1112 fails Luhn.", "IBAN DE89 3704 0044 0532 0130 01 fails mod-97.",
    "sk-xxxxxxxxxxxxxxxxxxxxxxxx is a placeholder", 'api_key = "your-api-key-here-please"',
    "The product is 1234567890123456789.", "Prices: 1.50, 2.75 and 10.00 dollars.",
])
def test_look_alikes_are_not_pii(text):
    assert pii.find([text], pii.KINDS) == []


def test_redaction_keeps_the_key_name():
    assert pii.redact('token: "Zx81Qp4rLm2Tv9Wc7Ks3"', ["api_key"]) == 'token: "[API_KEY]"'


@pytest.mark.parametrize("expression,problem", [("MIT", False), ("CC-BY-NC-4.0", True), ("MIT OR CC-BY-NC-4.0", False),
                                                ("MIT AND CC-BY-NC-4.0", True), ("Apache-2.0 WITH LLVM-exception", False)])
def test_license_expressions_against_allow_and_deny(expression, problem):
    assert bool(_license_problem(expression, ["MIT", "Apache-2.0"], ["CC-BY-NC-4.0"])) is problem


def test_worker_processes_give_the_same_report(tmp_path, clean_rows, monkeypatch):
    rows = clean_rows[0][:400] + clean_rows[0][:3] + [{"prompt": "Mail me at a.b@example.com", "response": "ok"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_ = write_jsonl(tmp_path / "eval.jsonl", clean_rows[1][:40] + clean_rows[0][5:6])
    alone = audit(str(train), str(eval_), policy=AuditPolicy(workers=1))
    monkeypatch.setattr(scan, "PARALLEL_MIN_RECORDS", 0)
    monkeypatch.setattr(scan, "BATCH_SIZE", 100)  # several batches per set, spread over two workers
    spread = audit(str(train), str(eval_), policy=AuditPolicy(workers=2))
    assert (spread.to_json(), len(alone.findings) > 3) == (alone.to_json(), True)


def test_importing_data_checks_does_not_import_torch_or_deepspeed():
    code = "import sys, data_checks; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]"


def test_near_duplicate_recall_on_planted_pairs_at_the_threshold():
    rng = random.Random(1)
    vocabulary = [f"w{i}" for i in range(50_000)]
    texts, pairs = [], []
    for _ in range(300):  # 13 words = 9 shingles; one changed word at the end gives Jaccard 8/10 = 0.8
        words = [rng.choice(vocabulary) for _ in range(13)]
        texts += [" ".join(words), " ".join(words[:-1] + [f"x{rng.randint(0, 10**9)}"])]
        pairs.append((len(texts) - 2, len(texts) - 1))
    hasher = duplicates.MinHasher(0.8, 128)
    words, owners = normalize.word_hashes(normalize.normalize(texts))
    shingles, shingle_owners = normalize.unique_per_owner(*normalize.ngram_hashes(words, owners, 5, True))
    left, right = duplicates.candidate_pairs(hasher.band_keys(shingles, shingle_owners, len(texts)),
                                             np.arange(len(texts)))
    offsets = np.r_[0, np.cumsum(np.bincount(shingle_owners, minlength=len(texts)))]
    similarity = duplicates.jaccard(left, right, offsets, shingles)
    found = set(zip(left[similarity >= 0.8 - 1e-12].tolist(), right[similarity >= 0.8 - 1e-12].tolist()))
    assert sum(p in found for p in pairs) / len(pairs) >= 0.97
