"""VQA accuracy exactly as the official evaluations compute it, by a named rule (`VQA_RULES`, below).

The 2017 official rule (GT-Vision-Lab `vqaEval.py`, `vqa2017`), per question:
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

Which rule (`rules`, the task setting `vqa_rules`, `score vqa --rules`): the rule above is one of several in
use, and they give different numbers for the same predictions (on realistic model answers, several points),
so every score names the one it used:

  vqa2017    GT-Vision-Lab/VQA vqaEval.py at a4f1afd ("updated for v2.0", 2017): the rule above.
  vqa2021    the same file at its HEAD a013f00 ("Fixed processing answers bug", 2021), which OpenFlamingo's
             vqa_metric.py copies: the annotators' answers have newlines/tabs made spaces and their ends
             stripped; the prediction is normalised (punctuation, then lowercase/numbers/articles/
             contractions) only when the annotators disagree, and then so are their answers (both steps).
             So `Yes` against ten `yes` scores 0 and `two` against ten `2` scores 0, while `none` against
             5 x `none` + 5 x `nothing` scores 1 (the five `none` become `0` too; under vqa2017 they stay
             `none` and the prediction `0` matches no one).
  lmms-eval  (the default) lmms-eval's vqav2_process_results as of 1afb184d (2025-07-15, the last before
             b439d829 changed it): every prediction first goes through EvalAIAnswerProcessor (from
             facebookresearch/mmf: lowercase, `,` and `?` deleted, `'s` -> ` 's`, then the punctuation and
             number/article/contraction steps, its comma test being "commas between digits"), then the
             vqa2021 rule. The default because it is the rule meant to score as EvalAI's server does (the
             server behind VQAv2 test-dev, where the papers' VQAv2 numbers come from): the prediction
             normalised as for an EvalAI submission, then the official code's current version. What that
             rests on:
             mmf names the processor after the server ("Processes an answer similar to Eval AI") and its
             `vqa_evalai_accuracy` metric ("similar comparision to Eval AI") normalises every prediction with
             it; visualqa.org's evaluation page lists the normalisation as applied to every answer. EvalAI's
             own scoring code is not public, so none of this is the server's code, and mmf's metric (which
             also normalises every annotator answer) differs from lmms-eval's in that.
             (lmms-eval since 28ea9a11, 2025-08, normalises both sides always; that rule is not offered.)
  vizwiz     VizWiz's own vqaEval.py (the Python evaluation distributed with the VizWiz VQA API): the
             prediction normalised as in vqa2017 but with VizWiz's contraction table (most apostrophes are
             typographic, e.g. `dont` -> `don’t`), the annotators' answers never normalised. So `u.s.`
             against 7 x `u.s.` scores 0 (the prediction becomes `us`).

All four leave annotators out by position (the references compare answer records, unique by answer_id).
"""

from __future__ import annotations

import re
from collections import defaultdict

from kosmos.config import VQA_RULES  # the names, where kosmos.config checks train.eval_tasks with them
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
# mmf's EvalAIAnswerProcessor (lmms-eval): one or more commas between digits
_COMMAS_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")

# VizWiz's table: the official one with typographic apostrophes (U+2019), except in the entries VizWiz's file
# writes with a straight one (its first five values, two keys and three values further on).
_STRAIGHT_KEYS = frozenset({"couldn'tve", "hadn'tve"})
_STRAIGHT_VALUES = frozenset({"ain't", "aren't", "can't", "could've", "couldn't", "we've", "where's",
                              "who've"})


def _typographic(text: str, straight: frozenset) -> str:
    return text if text in straight else text.replace("'", "\u2019")


VIZWIZ_CONTRACTIONS = {_typographic(k, _STRAIGHT_KEYS): _typographic(v, _STRAIGHT_VALUES)
                       for k, v in CONTRACTIONS.items()}

DEFAULT_RULES = "lmms-eval"
"""The default for VQAv2 / OK-VQA / any VQA task (VizWiz's task sets `vizwiz`); see the module docstring."""


def process_punctuation(text: str, comma_between_digits: re.Pattern = _COMMA_BETWEEN_DIGITS) -> str:
    """The official punctuation step (see the module docstring); `comma_between_digits` the test that deletes
    every punctuation mark (EvalAI's processor uses `_COMMAS_BETWEEN_DIGITS`)."""
    out = text
    delete_all = comma_between_digits.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str, contractions: dict = CONTRACTIONS) -> str:
    """Lowercase, number words to digits, articles dropped, contractions fixed, words joined by one space."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(contractions.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_answer(text: str) -> str:
    """mmf's EvalAIAnswerProcessor, as lmms-eval applies it to every prediction: lowercase, `,` and `?`
    deleted, `'s` -> ` 's`, stripped, then the punctuation step (comma test: commas between digits) and the
    number/article/contraction step."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = process_punctuation(_clean(text), _COMMAS_BETWEEN_DIGITS)
    return process_digit_article(text)


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


def _compared(prediction: str, answers: list[str], rules: str) -> tuple[str, list[str]]:
    """The prediction and the annotators' answers as rule `rules` compares them."""
    if rules == "vqa2017":
        gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
        return normalize_answer(prediction), gts
    if rules == "vizwiz":
        pred = process_digit_article(process_punctuation(_clean(prediction)), VIZWIZ_CONTRACTIONS)
        return pred, list(answers)
    if rules in ("vqa2021", "lmms-eval"):
        comma = _COMMA_BETWEEN_DIGITS if rules == "vqa2021" else _COMMAS_BETWEEN_DIGITS
        pred = _clean(prediction) if rules == "vqa2021" else evalai_answer(prediction)
        gts = [_clean(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a, comma)) for a in gts]
            pred = process_digit_article(process_punctuation(pred, comma))
        return pred, gts
    raise ValueError(f"unknown VQA rules {rules!r}; vqa_rules: {' | '.join(VQA_RULES)}")


def vqa_accuracy(prediction: str, answers: list[str], rules: str = DEFAULT_RULES) -> float:
    """VQA accuracy (0..1) of one predicted answer against the annotators' answers, by rule `rules` (one of
    VQA_RULES; see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy: no annotator answers to compare with")
    pred, gts = _compared(prediction, answers, rules)
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def _percent(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), 2)


def score_vqa(answers: dict, predictions: dict, answer_types: dict | None = None,
              question_types: dict | None = None, rules: str = DEFAULT_RULES,
              answerable: dict | None = None) -> dict:
    """Accuracy over the question ids of `predictions` by rule `rules`: {"accuracy": percent (2 decimals),
    "per_answer_type": {type: percent}, "per_question_type": {type: percent}, "n": questions, "rules": the
    rule's name}. Ids without annotator answers are an error naming how many and which.

    `answerable` ({id: 0/1}, VizWiz's field) adds the answerability figures over the ids that have it:
    "accuracy_answerable" / "accuracy_unanswerable" (the accuracy over each group) and, taking a prediction
    that normalises to `unanswerable` as the model's "unanswerable" verdict, "unanswerable_precision",
    "unanswerable_recall", "unanswerable_f1" (percent). VizWiz's own code scores unanswerability from a
    separate predicted probability (average precision and F1); a generated answer gives no probability, so
    average precision is left out. Papers (KOSMOS-1 included) report accuracy only."""
    if rules not in VQA_RULES:
        raise ValueError(f"unknown VQA rules {rules!r}; vqa_rules: {' | '.join(VQA_RULES)}")
    check_references(predictions, answers, "question ids", "annotator answers")
    overall, acc_by_id = [], {}
    by_answer_type, by_question_type = defaultdict(list), defaultdict(list)
    for qid, pred in predictions.items():
        acc = acc_by_id[qid] = vqa_accuracy(pred, answers[qid], rules)
        overall.append(acc)
        if answer_types is not None and answer_types.get(qid) is not None:
            by_answer_type[answer_types[qid]].append(acc)
        if question_types is not None and question_types.get(qid) is not None:
            by_question_type[question_types[qid]].append(acc)
    out = {
        "accuracy": _percent(overall),
        "per_answer_type": {t: _percent(v) for t, v in sorted(by_answer_type.items())},
        "per_question_type": {t: _percent(v) for t, v in sorted(by_question_type.items())},
        "n": len(overall),
        "rules": rules,
    }
    marked = {q: int(answerable[q]) for q in predictions if answerable and answerable.get(q) is not None}
    if marked:
        out.update(_answerability(predictions, marked, acc_by_id))
    return out


def _answerability(predictions: dict, marked: dict, acc_by_id: dict) -> dict:
    out = {}
    for name, flag in (("accuracy_answerable", 1), ("accuracy_unanswerable", 0)):
        accs = [acc_by_id[q] for q, a in marked.items() if a == flag]
        if accs:
            out[name] = _percent(accs)
    said = {q: normalize_answer(predictions[q]) == "unanswerable" for q in marked}
    hits = sum(said[q] and not a for q, a in marked.items())
    n_said, n_true = sum(said.values()), sum(not a for a in marked.values())
    precision = hits / n_said if n_said else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    out.update({"unanswerable_precision": round(100 * precision, 2),
                "unanswerable_recall": round(100 * recall, 2),
                "unanswerable_f1": round(100 * f1, 2), "n_answerability": len(marked)})
    return out
