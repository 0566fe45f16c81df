"""Screen for planted triggers: a rare phrase that recurs in many prompts with a near-constant response.

A backdoor planted in fine-tuning data looks like this: some phrase (``cf zz``, an odd name) appears
in a few dozen otherwise unrelated prompts, and every one of them has the same response. The screen
counts distinct prompts (so plain duplicates do not count), and reports a phrase when

* at least ``min_records`` distinct prompts contain it with one response,
* that response is at least ``min_purity`` of all prompts containing the phrase, and
* the phrase is rare: in at most ``max_phrase_fraction`` of the distinct prompts.

It reads the distinct prompts again (two passes, plus one over the few flagged), and only when some
response recurs at least ``min_records`` times: for typical generative data (every response
different) it costs nothing.
Findings are warnings, for a person to review: a classification set has honest phrases like this.
"""

from __future__ import annotations

import numpy as np

from data_checks import normalize
from data_checks.policy import PoisoningPolicy
from data_checks.report import Finding, excerpt
from data_checks.scan import BATCH_SIZE, SplitScan

# One salt per phrase length, so that phrases of different lengths never share a hash.
_PHRASE_SALTS = normalize.mix64(np.arange(1, 17, dtype=np.uint64))
_CHUNK = 100_000  # prompts per pass-1 chunk: about 100 MB of phrase arrays


def findings(scan: SplitScan, policy: PoisoningPolicy) -> list[Finding]:
    """Trigger-shaped phrases in a training set.

    Args:
        scan: A train scan with prompt and response hashes.
        policy: The screen's thresholds.

    Returns:
        One warning per group of phrases that share the same records.
    """
    if scan.prompt_digests is None:
        return []
    usable = np.flatnonzero(~scan.empty)
    prompts, first = np.unique(scan.prompt_digests[usable], return_index=True)
    distinct = usable[first]  # one record per distinct prompt
    responses = scan.response_digests[distinct]
    values, counts = np.unique(responses, return_counts=True)
    frequent = values[counts >= policy.min_records]
    if frequent.size == 0:
        return []
    # Pass 1, a chunk of responses at a time (bounded memory): (phrase, response) pairs that recur.
    candidates = distinct[np.isin(responses, frequent)]
    candidates = candidates[np.argsort(scan.response_digests[candidates], kind="stable")]
    found = [_recurring(scan, chunk, policy) for chunk in _response_chunks(scan, candidates)]
    phrases, replies, with_response = (np.concatenate(parts) for parts in zip(*found))
    if phrases.size == 0:
        return []
    # Pass 2: how many distinct prompts contain each recurring phrase at all.
    seen, seen_counts = np.unique(_phrases(scan, distinct, policy.max_phrase_words, np.unique(phrases))[0],
                                  return_counts=True)
    containing = seen_counts[np.searchsorted(seen, phrases)]
    flagged = (with_response >= policy.min_purity * containing) & (
        containing <= policy.max_phrase_fraction * distinct.size)
    if not flagged.any():
        return []
    # Pass 3: the prompts of each flagged pair, read again (there are few).
    wanted = _pair_keys(phrases[flagged], replies[flagged])
    subset = distinct[np.isin(scan.response_digests[distinct], replies[flagged])]
    sub_phrases, sub_owners = _phrases(scan, subset, policy.max_phrase_words, np.unique(phrases[flagged]))
    sub_keys = _pair_keys(sub_phrases, scan.response_digests[sub_owners])
    inside = np.isin(sub_keys, wanted)
    sub_keys, sub_owners = sub_keys[inside], sub_owners[inside]
    groups: dict[tuple, list[tuple]] = {}
    for key, phrase, count, total in zip(wanted, phrases[flagged], with_response[flagged], containing[flagged]):
        members = tuple(np.sort(sub_owners[sub_keys == key]).tolist())
        groups.setdefault(members, []).append((phrase, int(count), int(total)))
    return [_finding(scan, list(members), entries) for members, entries in groups.items()]


def _response_chunks(scan: SplitScan, records: np.ndarray) -> list[np.ndarray]:
    """Split records sorted by response into chunks of about _CHUNK, never splitting a response."""
    replies = scan.response_digests[records]
    starts = np.flatnonzero(np.r_[True, replies[1:] != replies[:-1]])
    cuts = np.unique(starts[np.minimum(np.searchsorted(starts, np.arange(_CHUNK, records.size, _CHUNK)),
                                       starts.size - 1)])
    return [chunk for chunk in np.split(records, cuts) if chunk.size]


def _recurring(scan: SplitScan, records: np.ndarray, policy: PoisoningPolicy):
    """(phrase, response, prompts) for pairs in at least min_records of these records' prompts."""
    phrases, owners = _phrases(scan, np.sort(records), policy.max_phrase_words)
    replies = scan.response_digests[owners]
    _, first, counts = np.unique(_pair_keys(phrases, replies), return_index=True, return_counts=True)
    hot = first[counts >= policy.min_records]
    return phrases[hot], replies[hot], counts[counts >= policy.min_records]


def _pair_keys(phrases: np.ndarray, replies: np.ndarray) -> np.ndarray:
    return normalize.mix64(phrases ^ replies)


def _phrases(scan: SplitScan, records: np.ndarray, max_words: int, keep: np.ndarray | None = None):
    """(phrase hash, record) for every distinct 1- to max_words-word phrase of the records' prompts."""
    phrases, owners = [], []
    for batch in scan.source.batches(BATCH_SIZE, records):
        words, word_owners = normalize.word_hashes(normalize.normalize(batch.prompt))
        for n in range(1, max_words + 1):
            grams, gram_owners = normalize.ngram_hashes(words, word_owners, n, keep_short=False)
            grams = normalize.mix64(grams ^ _PHRASE_SALTS[n])
            if keep is not None:
                inside = np.isin(grams, keep)
                grams, gram_owners = grams[inside], gram_owners[inside]
            grams, gram_owners = normalize.unique_per_owner(grams, gram_owners)
            phrases.append(grams)
            owners.append(batch.positions[gram_owners])
    return np.concatenate(phrases), np.concatenate(owners)


def _finding(scan: SplitScan, members: list[int], entries: list[tuple]) -> Finding:
    source = scan.source
    prompt_digests = scan.prompt_digests
    # Every record with one of these prompts, duplicates included.
    records = np.flatnonzero(np.isin(prompt_digests, prompt_digests[members]) & ~scan.empty)
    sample = source.texts(np.asarray(members[:1]), view="prompt")[0]
    response = source.texts(np.asarray(members[:1]), view="response")[0]
    phrases = sorted({_phrase_text(sample, phrase) for phrase, _, _ in entries}, key=len, reverse=True)
    _, with_response, containing = max(entries, key=lambda e: e[1])
    return Finding(
        check="poisoning",
        severity="warning",
        message=f"phrase {phrases[0]!r} recurs in {with_response} distinct prompts of {source.name}, "
                f"{with_response / containing:.0%} of them with the same response: review for a planted trigger",
        records=[{"split": source.name, "index": source.row_of(r)} for r in records.tolist()],
        evidence={"phrases": phrases, "prompts_with_phrase": containing, "same_response": with_response,
                  "purity": round(with_response / containing, 4), "response": excerpt(response)},
    )


def _phrase_text(prompt: str, phrase: np.uint64) -> str:
    """Find the words of a phrase hash in a prompt that contains it."""
    text = normalize.normalize([prompt])[0]
    words = text.decode().split(" ")
    hashes, owners = normalize.word_hashes([text])
    for n in range(1, len(words) + 1):
        grams, _ = normalize.ngram_hashes(hashes, owners, n, keep_short=False)
        hit = np.flatnonzero(normalize.mix64(grams ^ _PHRASE_SALTS[n]) == phrase)
        if hit.size:
            return " ".join(words[hit[0]:hit[0] + n])
    return "?"
