"""VQA accuracy exactly as the official VQA evaluation computes it (GT-Vision-Lab `vqaEval.py`).

The rule, per question:
  1. The predicted answer is always normalised: newlines and tabs become spaces, the ends are stripped,
     then punctuation (below), then lowercase, number words to digits ("none"/"zero" -> "0" ...
     "ten" -> "10"), the articles a/an/the dropped, and contraction spellings without apostrophe fixed
     ("dont" -> "don't", with the official table, its odd entries included).
  2. The annotators' answers are compared as they are written, except when they disagree among themselves
     (more than one distinct string): then each gets the punctuation step alone (no lowercasing, no number
     words, no articles). The official annotations are already lowercase and normalised.
  3. accuracy = the mean over the 10 leave-one-out subsets of annotators (each leaves one answer out) of
     min(1, matches in the other 9 / 3). So 2 of 10 annotators agreeing with the prediction give
     (8 subsets x 2/3 + 2 subsets x 1/3) / 10 = 0.6, not 2/3; 3 agreeing give 0.9; 4 or more give 1.
     Subsets are left out by position (the official code compares answer records, unique by answer_id).

Punctuation step: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it has a space on
either side somewhere in the text or when the text has a comma between digits ("1,000"), and otherwise
replaced by a space; then every period not followed by a digit is deleted (at most 32 of them: the
official code passes re.UNICODE where `re.sub` takes its count). Apostrophes and colons are kept.

Scores are percent, rounded to 2 decimals as the official code rounds them; per answer type and per
question type likewise.
"""

from __future__ import annotations

import re
from collections import defaultdict

from kosmos.eval.datasets import check_references

# The official contraction table (keys with capitals never match the lowercased text; kept as published).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# sic: "(?!<=" is a negative lookahead, not a lookbehind; in effect: any period not followed by a digit
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_MAX_PERIODS = 32  # re.UNICODE's value, passed as the count by the official code


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring)."""
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """Lowercase, number words to digits, articles dropped, contractions fixed, words joined by one space."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def postprocess_answer(generated: str) -> str:
    """The short answer in a generation: up to the first newline, stripped, without a trailing period
    (what OpenFlamingo does before scoring VQA; the official normalisation would drop that period anyway,
    and this keeps the answers written to the results file clean)."""
    answer = generated.split("\n", 1)[0].strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy (0..1) of one predicted answer against the annotators' answers."""
    if not answers:
        raise ValueError("vqa_accuracy: no annotator answers to compare with")
    pred = normalize_answer(prediction)
    gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def _percent(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), 2)


def score_vqa(answers: dict, predictions: dict, answer_types: dict | None = None,
              question_types: dict | None = None) -> dict:
    """Accuracy over the question ids of `predictions`: {"accuracy": percent (2 decimals), "per_answer_type":
    {type: percent}, "per_question_type": {type: percent}, "n": questions}. Ids without annotator answers
    are an error naming how many and which."""
    check_references(predictions, answers, "question ids", "annotator answers")
    overall = []
    by_answer_type, by_question_type = defaultdict(list), defaultdict(list)
    for qid, pred in predictions.items():
        acc = vqa_accuracy(pred, answers[qid])
        overall.append(acc)
        if answer_types is not None and answer_types.get(qid) is not None:
            by_answer_type[answer_types[qid]].append(acc)
        if question_types is not None and question_types.get(qid) is not None:
            by_question_type[question_types[qid]].append(acc)
    return {
        "accuracy": _percent(overall),
        "per_answer_type": {t: _percent(v) for t, v in sorted(by_answer_type.items())},
        "per_question_type": {t: _percent(v) for t, v in sorted(by_question_type.items())},
        "n": len(overall),
    }
