"""Score an existing predictions file against a benchmark's references; no model involved.

    python -m kosmos.eval.score captioning --annotations REFS.json --predictions PREDS.json [--split test]
    python -m kosmos.eval.score vqa --questions Q.json --annotations A.json --predictions PREDS.json
    python -m kosmos.eval.score vqa --questions VIZWIZ_VAL.json --predictions PREDS.json

captioning: REFS is a COCO caption file or Karpathy's dataset_*.json (the images of --split); PREDS the COCO
results format [{"image_id", "caption"}]. Metrics as pycocoevalcap computes them, x100.
vqa: the official question and annotation JSON (VQAv2, OK-VQA), or VizWiz's single file; PREDS the VQA
results format [{"question_id", "answer"}] (VizWiz: [{"image", "answer"}]). VQA accuracy, percent, by the rule
--rules names (vqa2017 | vqa2021 | lmms-eval | vizwiz; default lmms-eval, VizWiz's file vizwiz: see
kosmos.eval.vqa_metrics); the rule's name is in the output. VizWiz's file with `answerable` marks adds the
answerability figures.

The last line of stdout is one JSON object with the metrics. Predictions for ids the references lack, or
references without a prediction, are an error (exit 2) naming how many and which; --allow-missing scores
the predicted subset instead. A malformed file: a one-line error naming the file and the field, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter

from kosmos.errors import command_name
from kosmos.eval.datasets import EvalDataError, load_captions, load_vqa, read_json
from kosmos.eval.vqa_metrics import VQA_RULES


def _few(ids: list) -> str:
    return ", ".join(map(repr, ids[:5])) + (" ..." if len(ids) > 5 else "")


def _predictions(path, id_key: str, value_key: str, data=None) -> dict:
    """{id: value} from a results file [{id_key, value_key}] (`data`: its content, when already read), ids as
    written."""
    data = read_json(path) if data is None else data
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a list of {{{id_key!r}, {value_key!r}}} records, "
                            f"got {type(data).__name__}")
    out: dict = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or id_key not in rec:
            raise EvalDataError(f"{path}: [{i}].{id_key}: missing")
        key, value = rec[id_key], rec.get(value_key)
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise EvalDataError(f"{path}: [{i}].{id_key}: expected an int or a string, got {key!r:.40}")
        if not isinstance(value, str):
            raise EvalDataError(f"{path}: [{i}].{value_key}: expected a string, got {value!r:.40}")
        if key in out:
            raise EvalDataError(f"{path}: [{i}].{id_key}: duplicate id {key!r}")
        out[key] = value
    return out


def _match(predictions: dict, reference_ids: list, path, allow_missing: bool) -> dict:
    """The predictions keyed by the references' ids (an id written as "42" matches 42); unknown ids are an
    error, and so are references without a prediction unless `allow_missing`."""
    by_str = {str(k): k for k in reference_ids}
    unknown = [k for k in predictions if str(k) not in by_str]
    if unknown:
        raise EvalDataError(f"{path}: {len(unknown)} of {len(predictions)} predicted ids are not in the "
                            f"references: {_few(unknown)}")
    matched = {by_str[str(k)]: v for k, v in predictions.items()}
    if len(matched) < len(predictions):
        counts = Counter(str(k) for k in predictions)
        twice = [k for k in predictions if counts[str(k)] > 1]
        raise EvalDataError(f"{path}: {len(twice)} predictions name the same id twice (as a number and as a "
                            f"string): {_few(twice)}")
    missing = [k for k in reference_ids if k not in matched]
    if missing and not allow_missing:
        raise EvalDataError(f"{path}: {len(missing)} of {len(reference_ids)} reference ids have no "
                            f"prediction: {_few(missing)} (--allow-missing scores the predicted subset)")
    if missing:
        print(f"scoring the {len(matched)} predicted of {len(reference_ids)} ids "
              f"({len(missing)} without a prediction: {_few(missing)})", file=sys.stderr)
    if not matched:
        raise EvalDataError(f"{path}: no predictions")
    return matched


def score_captioning(args) -> dict:
    from kosmos.eval.caption_metrics import score_captions

    items = load_captions(args.annotations, image_root=".", split=args.split)
    refs = {it.id: it.references for it in items}
    preds = _match(_predictions(args.predictions, "image_id", "caption"), list(refs), args.predictions,
                   args.allow_missing)
    empty = [k for k in preds if not refs[k]]
    if empty:
        raise EvalDataError(f"{args.annotations}: {len(empty)} predicted images have no reference caption: "
                            f"{_few(empty)}")
    metrics = [m for m in ("BLEU", "METEOR", "ROUGE-L", "CIDEr") if m != "METEOR" or not args.no_meteor]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_captions(refs, preds, spice=args.spice, metrics=metrics)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return {**scores, "n": len(preds)}


def score_vqa_file(args) -> dict:
    from kosmos.eval.vqa_metrics import DEFAULT_RULES, score_vqa

    items = load_vqa(args.questions, args.annotations, image_root=".", image_pattern="{image_id}")
    # VQA results [{"question_id", "answer"}]; VizWiz's [{"image", "answer"}] (its items' ids are image names)
    raw = read_json(args.predictions)
    id_key = "image" if isinstance(raw, list) and raw and isinstance(raw[0], dict) and "image" in raw[0] \
        and "question_id" not in raw[0] else "question_id"
    preds = _match(_predictions(args.predictions, id_key, "answer", raw), [it.id for it in items],
                   args.predictions, args.allow_missing)
    by_id = {it.id: it for it in items}
    unanswered = [k for k in preds if not by_id[k].answers]
    if unanswered:
        src = args.annotations or args.questions
        raise EvalDataError(f"{src}: {len(unanswered)} of {len(preds)} predicted questions have no "
                            f"annotator answers: {_few(unanswered)}"
                            + ("" if args.annotations else " (VQAv2 and OK-VQA need --annotations)"))
    vizwiz = id_key == "image"
    rules = args.rules or ("vizwiz" if vizwiz else DEFAULT_RULES)
    return score_vqa({k: by_id[k].answers for k in preds}, preds,
                     answer_types={k: by_id[k].answer_type for k in preds},
                     question_types={k: by_id[k].question_type for k in preds}, rules=rules,
                     answerable={k: by_id[k].answerable for k in preds})


def _summary(task: str, scores: dict) -> str:
    if task == "captioning":
        return "  ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "n") + f"  (n={scores['n']})"
    types = "  ".join(f"{t} {v:.2f}" for t, v in scores["per_answer_type"].items())
    rules = f"  [{scores['rules']} rules]" if "rules" in scores else ""
    return (f"accuracy {scores['accuracy']:.2f}" + (f"  ({types})" if types else "") + f"  (n={scores['n']})"
            + rules)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("kosmos.eval", "score"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    cap = sub.add_parser("captioning", help="BLEU, METEOR, ROUGE-L, CIDEr (x100) of a COCO results file")
    cap.add_argument("--annotations", required=True, help="COCO caption file or Karpathy's dataset_*.json")
    cap.add_argument("--predictions", required=True, help='[{"image_id", "caption"}]')
    cap.add_argument("--split", default="test", help="Karpathy split (default: test)")
    cap.add_argument("--no-meteor", action="store_true", help="leave METEOR out (its Java start takes ~13 s)")
    cap.add_argument("--spice", action="store_true",
                     help="also SPICE, where its Stanford models are already in place (no download)")
    vqa = sub.add_parser("vqa", help="official VQA accuracy of a VQA results file")
    vqa.add_argument("--questions", required=True, help="official question JSON, or VizWiz's single file")
    vqa.add_argument("--annotations", help="official annotation JSON (none for VizWiz)")
    vqa.add_argument("--predictions", required=True,
                     help='[{"question_id", "answer"}] (VizWiz: [{"image", "answer"}])')
    vqa.add_argument("--rules", choices=VQA_RULES,
                     help="which VQA accuracy convention (default: lmms-eval; VizWiz's file: vizwiz)")
    for p in (cap, vqa):
        p.add_argument("--allow-missing", action="store_true",
                       help="score the predicted subset when some references have no prediction")
    args = ap.parse_args(argv)

    try:
        scores = score_captioning(args) if args.task == "captioning" else score_vqa_file(args)
    except (EvalDataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_summary(args.task, scores))
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    from kosmos.errors import run_cli

    sys.exit(run_cli(main))
