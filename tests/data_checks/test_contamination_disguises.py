"""Contamination that hides: eval items planted in train in every disguise of
benchmarks/contamination_recall.py are found, and different problems that share boilerplate are not."""

from __future__ import annotations

import pytest

from benchmarks.contamination_recall import DISGUISES, generated, plant
from data_checks import AuditPolicy, audit
from tests.data_checks.audit_data import write_jsonl

PER = 25
FOUND_AT_LEAST = {"edit10": 0.85, "paraphrase": 0.5}  # the rest: every one


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """(eval items a contamination finding names with a train record, the planted items by disguise,
    the eval items, the train record each finding names)."""
    folder = tmp_path_factory.mktemp("disguises")
    train, test = generated(1500, 300, seed=1)
    rows, planted = plant(train, test, PER, seed=1)
    policy = AuditPolicy(pii={"enabled": False}, quality={"enabled": False}, poisoning={"enabled": False},
                         duplicates={"enabled": False})  # contamination alone must find them
    report = audit(str(write_jsonl(folder / "train.jsonl", rows)), str(write_jsonl(folder / "eval.jsonl", test)),
                   policy=policy)
    pairs = {}
    for finding in report.findings:
        if finding.check == "ngram_contamination":
            by_split = {r["split"]: r["index"] for r in finding.records}
            pairs[by_split["eval"]] = by_split["train"]
    return pairs, planted, len(train)


@pytest.mark.parametrize("how", DISGUISES)
def test_planted_items_are_found_in_every_disguise(found, how):
    """One word in ten edited leaves some items under the coverage threshold, and a synonym table's
    swaps plus edits more (the semantic check is for those); every other disguise is found whole."""
    pairs, planted, _ = found
    items = [item for item, disguise in planted.items() if disguise == how]
    assert sum(item in pairs for item in items) >= FOUND_AT_LEAST.get(how, 1.0) * len(items)


def test_each_finding_names_the_record_the_item_was_planted_in(found):
    pairs, planted, train_size = found
    order = list(planted)  # plant() appends the disguised rows in this order after the training set
    assert {item: pairs[item] for item in planted if item in pairs} == \
        {item: train_size + order.index(item) for item in planted if item in pairs}


def test_different_problems_sharing_boilerplate_are_not_flagged(found):
    pairs, planted, _ = found
    assert [item for item in pairs if item not in planted] == []


def test_swapped_numbers_hide_an_item_only_when_numbers_compare_as_numbers(tmp_path):
    """Every third word a number: swapping them all breaks every n-gram unless numbers compare equal."""
    item = ("Tom has 12 apples and 7 pears then buys 3 more apples for 4 dollars and 5 cents each and "
            "gives 2 apples to 6 friends on 9 days so how many apples are left after 8 weeks")
    swapped = " ".join(str(int(w) + 10) if w.isdigit() else w for w in item.split())
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": swapped}] + [{"text": f"unrelated record {i}"} for i in range(20)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": item}, {"text": "another question entirely about trains"}])

    def flagged(**contamination):
        report = audit(str(train), str(held), policy=AuditPolicy(contamination=contamination))
        return [f.records for f in report.findings if f.check == "ngram_contamination"]

    assert flagged() == [[{"split": "eval", "index": 0}, {"split": "train", "index": 0}]]
    assert flagged(numbers_as_one=False) == []


def test_report_shows_the_item_beside_its_record_with_the_shared_words_marked(tmp_path):
    item = ("Tom has 12 apples and 7 pears. He buys 3 more apples for 4 dollars each at the big store near "
            "his house. How many apples does Tom have now?")
    copy = "Homework: " + item.replace("12", "15").replace("big", "large") + " Explain."
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": copy}] + [{"text": f"other record {i}"} for i in range(10)])
    report = audit(str(train), str(write_jsonl(tmp_path / "eval.jsonl", [{"text": item}])), report_dir=tmp_path / "out")
    finding = next(f for f in report.findings if f.check == "ngram_contamination")
    assert finding.evidence["coverage"] == round(29 / 30, 4) and finding.evidence["longest_shared_words"] == 18
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert ("| **tom has 12 apples and 7 pears he buys 3 more apples for 4 dollars each at the** big **store near "
            "his house how many apples does tom have now** | homework **tom has 15 apples") in markdown
