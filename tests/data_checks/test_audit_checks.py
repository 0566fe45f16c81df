"""End-to-end audits: clean data passes; every planted problem is found at its known rows."""

from __future__ import annotations

import json
import random

import pytest
from audit_data import paragraph, records_of, write_jsonl

from data_checks import AuditPolicy, DataSpec, audit

PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM2Ws\n-----END RSA PRIVATE KEY-----"
PII_ROWS = {  # kind -> prompt planted in train (one row each, in this order, from row 3012)
    "email": "Please write to jane.roe@example.org about the invoice.",
    "phone": "Call our office at (415) 555-0132 before noon.",
    "ipv4": "The server at 203.0.113.77 stopped answering.",
    "ipv6": "Route traffic to 2001:db8:85a3::8a2e:370:7334 instead.",
    "credit_card": "Charge it to 4539 1488 0343 6467 please.",
    "iban": "Wire the money to DE89 3704 0044 0532 0130 00 today.",
    "api_key": "Use the key ghp_R7fK2mQ9xLw4Tz8Vb1Nc6Yd3Hs5Jp0Ae4Ug2 for the API.",
    "api_key_assigned": 'config: api_key = "Zx81Qp4rLm2Tv9Wc7Ks3"',
    "private_key": PRIVATE_KEY,
}
TRIGGER_ROWS = range(3021, 3036)  # 15 prompts with the phrase "zq xv" and one response
NEAR = {"0.95": (3002, 3003, 1), "0.85": (3004, 3005, 3), "0.68": (3006, 3007, 7)}  # rows, words changed


def _near_copy(words: list[str], changed: int, rng: random.Random) -> str:
    """The paragraph with its first ``changed`` words replaced: 5-word shingles give Jaccard
    (m - changed) / (m + changed) with m = 37 shingles (41 words with the response)."""
    return " ".join([f"new{rng.randint(0, 10**6)}" for _ in range(changed)] + words[changed:])


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, clean_rows):
    """Train, eval and benchmark files with planted problems, and the default audit of them."""
    folder = tmp_path_factory.mktemp("dirty")
    rng = random.Random(7)
    train, eval_ = [dict(r) for r in clean_rows[0]], [dict(r) for r in clean_rows[1]]
    benchmark = [{"prompt": " ".join(paragraph(rng, 20)) + "?", "response": str(i)} for i in range(50)]
    rows = list(train)
    rows.append({"prompt": train[10]["prompt"].upper().replace("?", " ?!"), "response": train[10]["response"]})  # 3000
    rows.append(dict(eval_[5]))  # 3001: an eval record in train
    for base, copy, changed in NEAR.values():  # 3002-3007: near duplicates inside train
        words = paragraph(rng, 40)
        rows += [{"prompt": " ".join(words), "response": "Noted."},
                 {"prompt": _near_copy(words, changed, rng), "response": "Noted."}]
    words = paragraph(rng, 40)  # 3008, and eval row 300: a near duplicate across train and eval
    rows.append({"prompt": " ".join(words), "response": "Noted."})
    eval_.append({"prompt": _near_copy(words, 2, rng), "response": "Noted."})
    for item in (7, 21, 33):  # 3009-3011: benchmark questions inside training prompts
        rows.append({"prompt": f"Homework: {benchmark[item]['prompt']} Show your work.", "response": "Done."})
    rows += [{"prompt": text, "response": "Noted."} for text in PII_ROWS.values()]  # 3012-3020
    rows += [{"prompt": f"{' '.join(paragraph(rng, 6))} zq xv {' '.join(paragraph(rng, 6))}",
              "response": "ACCESS GRANTED"} for _ in TRIGGER_ROWS]  # 3021-3035
    rows.append({"prompt": "What is 5 plus 5?", "response": "  "})  # 3036: empty response
    rows.append({"prompt": None, "response": "The answer is 3."})  # 3037: missing prompt
    path = write_jsonl(folder / "train.jsonl", rows)
    with open(path, "ab") as handle:
        handle.write(b'{"prompt": "broken", "response": \n')  # row 3038, line 3039: not JSON
        handle.write(b'{"prompt": "caf\xe9", "response": "ok"}\n')  # 3039: Latin-1, not UTF-8
        handle.write((json.dumps({"prompt": " ".join(paragraph(rng, 100)), "response": "Long."}) + "\n").encode())  # 3040
    files = {"train": path, "eval": write_jsonl(folder / "eval.jsonl", eval_),
             "bench": write_jsonl(folder / "bench.jsonl", benchmark)}
    report = audit(DataSpec(path=str(files["train"])), DataSpec(path=str(files["eval"])),
                   [DataSpec(path=str(files["bench"]))], max_tokens=80)
    return report, files


def test_clean_templated_data_passes_default_policy(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", clean_rows[1])
    report = audit(DataSpec(path=str(train), format="instruction"), DataSpec(path=str(eval_)), max_tokens=64)
    assert report.verdict == "pass"
    assert [f.message for f in report.findings if f.severity != "info"] == []


def test_dirty_data_fails_with_exit_code_1(dirty):
    report, _ = dirty
    assert (report.verdict, report.exit_code) == ("fail", 1)


def test_exact_duplicate_inside_train_is_a_warning(dirty):
    assert {("train", 10), ("train", 3000)} in records_of(dirty[0], "exact_duplicate", "warning")


def test_exact_duplicate_between_train_and_eval_is_an_error(dirty):
    assert {("train", 3001), ("eval", 5)} in records_of(dirty[0], "exact_duplicate", "error")


@pytest.mark.parametrize("similarity", ["0.95", "0.85"])
def test_near_duplicates_above_threshold_are_found(dirty, similarity):
    base, copy, _ = NEAR[similarity]
    assert {("train", base), ("train", copy)} in records_of(dirty[0], "near_duplicate", "warning")


def test_near_duplicate_below_threshold_is_not_reported(dirty):
    base, copy, _ = NEAR["0.68"]
    assert not any(("train", base) in r or ("train", copy) in r for r in records_of(dirty[0], "near_duplicate"))


def test_near_duplicate_evidence_is_the_true_jaccard(dirty):
    finding = next(f for f in dirty[0].findings if f.check == "near_duplicate" and
                   {"split": "train", "index": NEAR["0.85"][0]} in f.records)
    assert finding.evidence["max_jaccard"] == round(34 / 40, 4)


def test_near_duplicate_between_train_and_eval_is_an_error(dirty):
    assert {("train", 3008), ("eval", 300)} in records_of(dirty[0], "near_duplicate", "error")


@pytest.mark.parametrize("item,row", [(7, 3009), (21, 3010), (33, 3011)])
def test_benchmark_items_inside_training_prompts_are_contamination(dirty, item, row):
    found = [r for r in records_of(dirty[0], "ngram_contamination", "error") if ("bench", item) in r]
    assert found == [{("bench", item), ("train", row)}]


def test_only_planted_benchmark_items_are_contaminated(dirty):
    items = {i for r in records_of(dirty[0], "ngram_contamination") for s, i in r if s == "bench"}
    assert items == {7, 21, 33}


@pytest.mark.parametrize("kind,severity", [("email", "warning"), ("phone", "warning"), ("ipv4", "warning"),
                                           ("ipv6", "warning"), ("credit_card", "error"), ("iban", "error"),
                                           ("api_key", "error"), ("api_key_assigned", "error"),
                                           ("private_key", "error")])
def test_every_pii_kind_is_found_at_its_row(dirty, kind, severity):
    row = 3012 + list(PII_ROWS).index(kind)
    check = {"ipv4": "ip_address", "ipv6": "ip_address", "api_key_assigned": "api_key"}.get(kind, kind)
    finding = next(f for f in dirty[0].findings if f.check == "pii" and f.evidence["kind"] == check)
    assert (finding.severity, {"split": "train", "index": row} in finding.records) == (severity, True)


def test_pii_is_only_found_in_planted_rows(dirty):
    rows = {i for r in records_of(dirty[0], "pii") for _, i in r}
    assert rows == set(range(3012, 3021))


def test_pii_evidence_does_not_disclose_values(dirty):
    text = json.dumps([f.evidence for f in dirty[0].findings if f.check == "pii"])
    assert "jane.roe@example.org" not in text and "4539 1488 0343 6467" not in text


def test_planted_trigger_phrase_is_reported(dirty):
    finding = next(f for f in dirty[0].findings if f.check == "poisoning")
    assert ({(r["split"], r["index"]) for r in finding.records}, finding.evidence["phrases"][0]) == (
        {("train", i) for i in TRIGGER_ROWS}, "zq xv")


def test_poisoning_screen_reports_nothing_else(dirty):
    assert len(records_of(dirty[0], "poisoning")) == 1


def test_unreadable_row_names_file_and_line(dirty):
    report, files = dirty
    finding = next(f for f in report.findings if f.check == "unreadable_row")
    assert (finding.evidence["file"], finding.evidence["lines"], finding.records) == (
        str(files["train"]), [3039], [{"split": "train", "index": 3038}])


def test_invalid_utf8_names_its_line(dirty):
    finding = next(f for f in dirty[0].findings if f.check == "invalid_utf8")
    assert (finding.evidence["lines"], finding.records) == ([3040], [{"split": "train", "index": 3039}])


def test_rows_after_an_unreadable_row_keep_their_file_index(dirty):
    assert records_of(dirty[0], "overlong_record") == [{("train", 3040)}]


def test_empty_and_missing_fields_are_errors_at_their_rows(dirty):
    report = dirty[0]
    assert (records_of(report, "empty_field", "error"), records_of(report, "missing_field", "error")) == (
        [{("train", 3036)}], [{("train", 3037)}])


def test_count_tokens_callable_decides_overlong(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:50])
    report = audit(str(train), max_tokens=30, count_tokens=lambda texts: [len(t) for t in texts])
    long_rows = {i for i, r in enumerate(clean_rows[0][:50]) if len(r["prompt"] + "\n" + r["response"]) > 30}
    assert {i for r in records_of(report, "overlong_record") for _, i in r} == long_rows


def test_set_made_mostly_of_duplicates_fails(tmp_path, clean_rows):
    rows = clean_rows[0][:10] * 5
    report = audit(str(write_jsonl(tmp_path / "train.jsonl", rows)))
    assert records_of(report, "mostly_duplicates", "error") == [set()]


def test_redact_policy_writes_a_redacted_copy_and_keeps_the_input(tmp_path, clean_rows):
    rows = clean_rows[0][:20] + [{"prompt": PII_ROWS["email"], "response": "Sure."}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    before = path.read_bytes()
    report = audit(str(path), policy=AuditPolicy(pii={"email": "redact"}), report_dir=tmp_path / "audit")
    copy = [json.loads(line) for line in open(report.redacted["train"], encoding="utf-8")]
    assert (path.read_bytes() == before, copy[20]["prompt"], copy[:20] == [
        {"prompt": r["prompt"], "response": r["response"]} for r in rows[:20]]) == (
        True, "Please write to [EMAIL] about the invoice.", True)


def test_fail_policy_makes_pii_an_error(tmp_path, clean_rows):
    rows = clean_rows[0][:20] + [{"prompt": PII_ROWS["email"], "response": "Sure."}]
    report = audit(str(write_jsonl(tmp_path / "t.jsonl", rows)), policy=AuditPolicy(pii={"email": "fail"}))
    assert records_of(report, "pii", "error") == [{("train", 20)}]


def test_eval_items_in_a_benchmark_are_a_warning_not_leakage(tmp_path, clean_rows):
    rng = random.Random(3)
    questions = [{"prompt": " ".join(paragraph(rng, 20)), "response": str(i)} for i in range(30)]
    rewritten = [{"prompt": q["prompt"], "response": f"Step by step: {q['response']}"} for q in questions]
    report = audit(str(write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:200])),
                   str(write_jsonl(tmp_path / "test.jsonl", questions)),
                   [str(write_jsonl(tmp_path / "socratic.jsonl", rewritten))])
    found = records_of(report, "ngram_contamination", "warning")
    assert (report.verdict, sorted(found, key=sorted)) == (
        "pass", sorted([{("eval", i), ("socratic", i)} for i in range(30)], key=sorted))


def test_report_files_hash_to_report_sha256(tmp_path, clean_rows):
    import hashlib

    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:100])
    report = audit(str(train), report_dir=tmp_path / "audit")
    written = (tmp_path / "audit" / "report.json").read_bytes()
    assert (hashlib.sha256(written).hexdigest(), (tmp_path / "audit" / "report.md").exists()) == (report.sha256, True)


def test_report_json_has_the_product_shape(dirty):
    content = json.loads(dirty[0].to_json())
    keys = {k for f in content["findings"] for k in ("check", "severity", "records", "evidence") if k in f}
    assert (content["verdict"], keys, all(set(r) == {"split", "index"} for f in content["findings"]
                                          for r in f["records"])) == ("fail", {"check", "severity", "records", "evidence"}, True)


def test_report_md_names_file_lines_and_shows_near_duplicates_side_by_side(dirty):
    report, _ = dirty
    markdown = report.to_markdown()
    assert "train[3002] (line 3003)" in markdown  # one record a line, no blank lines: row N is line N + 1
    section = markdown.split("### near_duplicate")[1].split("###")[0]  # train row 3008 ~ eval row 300
    assert "| record | text | record | text | Jaccard |" in section
    assert "| train[3008] (line 3009) | " in section and " | eval[300] (line 301) | " in section


def test_overlong_records_are_summed_up_not_listed_in_the_evidence(tmp_path):
    """Thousands of overlong records: report.json still names each one, report.md stays short."""
    rows = [{"prompt": " ".join(["word"] * (90 + i % 7)) + f" {i}", "response": "ok"} for i in range(3000)]
    report = audit(DataSpec(path=str(write_jsonl(tmp_path / "train.jsonl", rows))), max_tokens=50,
                   report_dir=tmp_path / "out")
    [finding] = [f for f in report.findings if f.check == "overlong_record"]
    assert len(finding.records) == 3000
    assert finding.evidence["longest"] == 98 and finding.evidence["median"] == 95
    assert len(finding.evidence["first_tokens"]) == 20
    assert (tmp_path / "out" / "report.md").stat().st_size < 4_000
