"""Likelihood-ranked multiple choice (issue 23 item 4): the paper's language tasks read in their distributed
formats and built as lm-evaluation-harness builds them, partial scoring for Winograd-style tasks, acc and
acc_norm (characters), ROC AUC for HatefulMemes, zero- and few-shot end to end on the tiny model, and the
OCR-free tasks with an image in context."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import PHOTOS, checkpoint_dir, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    return checkpoint_dir(tmp_path_factory.mktemp("eval_ranked") / "run", tiny_tokenizer.path,
                          tiny_model(seed=3))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = {  # one or two rows of each benchmark, with the fields its released files have
    "hellaswag": [{"ind": 24, "activity_label": "Roof shingle removal",
                   "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                   "ctx": "A man is sitting on a roof. he", "split": "val",
                   "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                               "is holding a rubik's cube.", "starts pulling up roofing [title] on a roof."],
                   "label": 3},
                  {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
                   "ctx_b": "she", "endings": ["lifts it.", "sits.", "runs off.", "sings."], "label": "0"}],
    "wsc273": [{"text": "The city councilmen refused the demonstrators a permit because they feared "
                "violence.", "pronoun": "they", "pronoun_loc": 63, "quote": "they feared violence",
                "quote_loc": 63, "options": ["The city councilmen", "The demonstrators"], "label": 0,
                "source": "(Winograd 1972)"}],
    "winogrande": [{"qID": "3QHITW7-1", "sentence": "Sarah was a much better surgeon than Maria so _ always "
                    "got the harder cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
                   {"qID": "3QHITW7-2", "sentence": "Sarah was a much better surgeon than Maria so _ always "
                    "got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"}],
    "piqa": [{"goal": "How do I ready a guinea pig cage for it's new occupants?",
              "sol1": "Provide the guinea pig with a cage full of a few inches of bedding.",
              "sol2": "Provide the guinea pig with a cage full of a few inches of jello."}],
    "boolq": [{"question": "is windows movie maker part of windows essentials", "passage": "Windows Movie "
               "Maker is a discontinued video editing software by Microsoft.", "idx": 0, "label": True},
              {"question": "is confectionary sugar the same as powdered sugar", "passage": "Powdered sugar, "
               "also called confectioners' sugar, is a finely ground sugar.", "idx": 1, "label": False}],
    "cb": [{"premise": "It was a complex language. Not written down but handed down.", "hypothesis": "the "
            "language was peeled down", "label": "contradiction", "idx": 0}],
    "copa": [{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
              "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0},
             {"premise": "The woman tolerated her friend's difficult behavior.", "choice1": "The woman knew "
              "her friend was going through a hard time.", "choice2": "The woman felt that her friend took "
              "advantage of her kindness.", "question": "effect", "idx": 1, "label": 0}],
    "storycloze": [{"story_id": "b929f263", "input_sentence_1": "Rick grew up in a troubled household.",
                    "input_sentence_2": "He never found good support in family.", "input_sentence_3": "He "
                    "turned to gangs.", "input_sentence_4": "It was not long before Rick got shot.",
                    "sentence_quiz1": "Rick is happy now.", "sentence_quiz2": "Rick joined a gang.",
                    "answer_right_ending": 1}],
}


def test_each_reader_builds_the_texts_as_lm_evaluation_harness_does(tmp_path):
    from kosmos.eval.datasets import EvalDataError, load_ranked

    def one(fmt, **kw):
        return load_ranked(fmt, jsonl(tmp_path / f"{fmt}.jsonl", ROWS[fmt]), **kw)

    h = one("hellaswag")
    assert h[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert h[0].continuations[3] == " starts pulling up roofing. on a roof."  # " [title]" -> ". "
    assert h[0].choices[3] == "starts pulling up roofing. on a roof." and (h[0].label, h[1].label) == (3, 0)
    w = one("wsc273")[0]  # partial: the option in the context, the rest of the sentence scored
    head = "The city councilmen refused the demonstrators a permit because "
    assert w.contexts == [head + "the city councilmen", head + "the demonstrators"]
    assert w.continuations == [" feared violence."] * 2 and w.label == 0
    g = one("winogrande")
    assert g[0].contexts[1] == "Sarah was a much better surgeon than Maria so Maria"
    assert g[0].continuations == [" always got the harder cases."] * 2 and [x.label for x in g] == [0, 1]
    assert [x.id for x in g] == ["3QHITW7-1", "3QHITW7-2"]
    labels = tmp_path / "valid-labels.lst"
    labels.write_text("0\n")
    p = one("piqa", labels=str(labels))[0]
    assert p.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert p.continuations[1].startswith(" Provide") and p.label == 0
    assert one("piqa")[0].label is None  # no labels: predictions only
    labels.write_text("0\n1\n")
    with pytest.raises(EvalDataError, match=r"valid-labels.lst: labels: 2 labels for the 1 rows of"):
        one("piqa", labels=str(labels))
    b = one("boolq")
    assert b[0].contexts[0].endswith(
        "\nQuestion: is windows movie maker part of windows essentials?\nAnswer:")
    assert b[0].continuations == [" no", " yes"] and [x.label for x in b] == [1, 0]
    c = one("cb")[0]
    assert c.contexts[0].endswith(
        "\nQuestion: the language was peeled down. True, False, or Neither?\nAnswer:")
    assert c.continuations == [" True", " False", " Neither"] and c.label == 1
    cp = one("copa")
    assert cp[0].contexts[0] == "My body cast a shadow over the grass because"
    assert cp[1].contexts[0] == "The woman tolerated her friend's difficult behavior therefore"
    assert cp[0].continuations == [" the sun was rising.", " the grass was cut."]  # one space, not two
    assert cp[0].choices[0] == " the sun was rising."  # lm-eval's choice string: acc_norm counts the space
    s = one("storycloze")[0]
    assert s.contexts[0].startswith("Rick grew up in a troubled household. He never") and s.label == 0
    (tmp_path / "cloze.csv").write_text(
        "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,RandomFifthSentenceQuiz1,"
        "RandomFifthSentenceQuiz2,AnswerRightEnding\nb929f263,A.,B.,C.,D.,E one.,E two.,2\n")
    csv_item = load_ranked("storycloze", tmp_path / "cloze.csv")[0]
    assert (csv_item.id, csv_item.contexts[0], csv_item.continuations, csv_item.label) == (
        "b929f263", "A. B. C. D.", [" E one.", " E two."], 1)


def test_bad_rows_are_one_line_naming_the_file_line_and_field(tmp_path):
    from kosmos.eval.datasets import EvalDataError, load_ranked

    bad = {**ROWS["copa"][0], "question": "why"}
    with pytest.raises(EvalDataError, match=r"copa.jsonl:1: question: expected 'cause' or 'effect'"):
        load_ranked("copa", jsonl(tmp_path / "copa.jsonl", [bad]))
    with pytest.raises(EvalDataError, match=r"cb.jsonl:1: label: expected a label 0..2 or one of"):
        load_ranked("cb", jsonl(tmp_path / "cb.jsonl", [{**ROWS["cb"][0], "label": "maybe"}]))
    with pytest.raises(EvalDataError, match=r"w.jsonl:1: sentence: has no _"):
        load_ranked("winogrande", jsonl(tmp_path / "w.jsonl", [{**ROWS["winogrande"][0], "sentence": "x"}]))
    with pytest.raises(EvalDataError, match=r"b.jsonl:2: id: 0 is already the id of"):
        load_ranked("boolq", jsonl(tmp_path / "b.jsonl", [ROWS["boolq"][0], ROWS["boolq"][0]]))
    with pytest.raises(ValueError, match="unknown ranked-choice format 'nope'; formats: storycloze"):
        load_ranked("nope", jsonl(tmp_path / "x.jsonl", [{}]))


def test_acc_is_the_summed_log_likelihood_and_acc_norm_divides_by_characters(ckpt, tmp_path):
    """The recorded scores equal continuation_logprobs on the text lm-eval would score; acc_norm is argmax of
    score / len(choice); Winograd-style items get acc only."""
    from kosmos.eval.ranking import continuation_ids, continuation_logprobs
    from kosmos.eval.run import Shots, load_task_data, run_task
    from kosmos.eval.tasks import get_task
    from kosmos.generate import build_prompt, load_for_inference

    model, enc = load_for_inference(str(ckpt))
    spec = get_task("hellaswag")
    data = load_task_data(spec, str(jsonl(tmp_path / "h.jsonl", ROWS["hellaswag"])))
    res = run_task(model, enc, "hellaswag", spec, data, tmp_path / "out", Shots(), progress=False)
    lines = (res.folder / "predictions.rank0.jsonl").read_text().splitlines()
    recs = {r["id"]: r for r in map(json.loads, lines)}
    item = data.items[0]
    ctx = item.candidates[0]["context"]
    got = recs[24]["scores"]
    tok = enc.tokenizer
    bos = build_prompt(enc, ctx, []).ids[0]
    assert build_prompt(enc, ctx, []).ids == [bos, *tok.encode(ctx)]  # lm-eval's context encoding, after <s>
    for score, cand in zip(got, item.candidates, strict=True):
        # lm-eval's _encode_pair: encode(context + continuation) less encode(context); one plain forward
        whole = tok.encode(ctx + cand["continuation"])
        n_ctx = len(tok.encode(ctx))
        assert whole[:n_ctx] == tok.encode(ctx)
        with torch.no_grad():
            logp = model(torch.tensor([[bos, *whole]]), None, None).logits[0].float().log_softmax(-1)
        want = sum(logp[n_ctx + t, whole[n_ctx + t]].item() for t in range(len(whole) - n_ctx))
        assert math.isclose(score, want, rel_tol=1e-4, abs_tol=1e-4)
    norm = [s / len(c["choice"]) for s, c in zip(got, item.candidates, strict=True)]
    assert recs[24]["prediction_norm"] == norm.index(max(norm))
    assert recs[24]["prediction"] == got.index(max(got))
    acc = 100 * sum(recs[it.id]["prediction"] == it.label for it in data.items) / 2
    assert res.metrics["acc"] == acc and "acc_norm" in res.metrics and res.metrics["n"] == 2

    spec = get_task("winogrande")
    data = load_task_data(spec, str(jsonl(tmp_path / "w.jsonl", ROWS["winogrande"])))
    res = run_task(model, enc, "winogrande", spec, data, tmp_path / "out", Shots(), progress=False)
    assert set(res.metrics) == {"acc", "n"}  # partial scoring: the continuation is shared, no acc_norm
    rec = json.loads((res.folder / "predictions.rank0.jsonl").read_text().splitlines()[0])
    cand = data.items[0].candidates
    want = continuation_logprobs(model, [build_prompt(enc, c["context"], []) for c in cand],
                                 [[continuation_ids(enc.tokenizer, c["context"], c["continuation"])]
                                  for c in cand])
    assert all(math.isclose(a, b[0][0], rel_tol=1e-4, abs_tol=1e-4)
               for a, b in zip(rec["scores"], want, strict=True))


@pytest.mark.parametrize("task", ["storycloze", "hellaswag", "winograd", "winogrande", "piqa", "boolq", "cb",
                                  "copa"])
def test_every_language_task_runs_zero_and_few_shot_from_the_cli(ckpt, tmp_path, task, capsys):
    from kosmos.eval import main
    from kosmos.eval.tasks import TASKS

    fmt = TASKS[task].format
    rows = ROWS[fmt]
    if fmt == "piqa":
        rows = [{**rows[0], "label": 1}, {**rows[0], "goal": "How to open a jar?", "label": 0}]
    data = jsonl(tmp_path / "val.jsonl", rows)
    support = jsonl(tmp_path / "train.jsonl", rows * 1)
    out = tmp_path / "out"
    assert main(["run", "--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--support",
                 str(support), "--shots", "0,1", "--out", str(out), "--no-progress"]) == 0
    for k in (0, 1):
        m = json.loads((out / task / f"{k}shot" / "metrics.json").read_text())
        assert m["predicted"] == len(rows) and 0 <= m["metrics"]["acc"] <= 100
        assert ("f1" in m["metrics"]) == (task == "cb")
        assert m["provenance"]["scorer"]["format"] == fmt
    assert f"| {task} | 1 | {len(rows)} |" in (out / "results.md").read_text()


def test_few_shot_demonstrations_are_the_right_candidates_of_support_items(ckpt, tmp_path):
    from kosmos.eval.run import Predictor, build_shots, load_support, load_task_data
    from kosmos.eval.tasks import get_task
    from kosmos.generate import load_for_inference

    model, enc = load_for_inference(str(ckpt))
    spec = get_task("copa")
    data = load_task_data(spec, str(jsonl(tmp_path / "val.jsonl", ROWS["copa"][:1])))
    data.support = load_support(spec, str(tmp_path / "val.jsonl"),
                                str(jsonl(tmp_path / "train.jsonl", ROWS["copa"][1:])))
    shots = build_shots(model, enc, spec, data, 1)
    ctx = Predictor(model, enc, spec, data, shots)
    q = ctx.kind.prompt(ctx, data.items[0])
    text = enc.tokenizer.decode(q["prompts"][0].ids)
    demo = ("The woman tolerated her friend's difficult behavior therefore the woman knew her friend was "
            "going through a hard time.\n\nMy body cast a shadow over the grass because")
    assert text.replace("<s>", "").strip() == demo


def test_image_tasks_rank_the_papers_answers_with_the_image_in_context(ckpt, tmp_path):
    """Rendered SST-2 (a folder per class, as released) and HatefulMemes (its JSONL): the paper's prompts,
    acc, and ROC AUC over the log-odds of "yes"."""
    from kosmos.eval import main
    from kosmos.eval.tasks import PAPER

    sst = tmp_path / "rendered-sst2" / "test"
    for c, name in enumerate(("negative", "positive")):
        (sst / name).mkdir(parents=True)
        for j in range(2):
            shutil.copy(PHOTOS[2 * c + j], sst / name / f"{j}.png")
    out = tmp_path / "out"
    assert main(["run", "--checkpoint", str(ckpt), "--task", "rendered_sst2", "--data", str(sst), "--out",
                 str(out), "--no-progress"]) == 0
    m = json.loads((out / "rendered_sst2" / "0shot" / "metrics.json").read_text())
    assert m["predicted"] == 4 and set(m["metrics"]) == {"acc", "acc_norm", "n"}
    assert m["paper"] == PAPER[("rendered_sst2", 0)] == {"acc": 67.1}
    assert main(["run", "--checkpoint", str(ckpt), "--task", "rendered_sst2", "--data", str(sst), "--support",
                 str(sst), "--shots", "1", "--out", str(out), "--no-progress"]) == 0  # demo: image + answer
    assert json.loads((out / "rendered_sst2" / "1shot" / "metrics.json").read_text())["predicted"] == 4
    memes = tmp_path / "hm"
    (memes / "img").mkdir(parents=True)
    rows = []
    for i in range(4):
        shutil.copy(PHOTOS[i], memes / "img" / f"{i:05d}.png")
        rows.append({"id": 42950 + i, "img": f"img/{i:05d}.png", "label": i % 2, "text": "some meme text"})
    assert main(["run", "--checkpoint", str(ckpt), "--task", "hatefulmemes", "--data",
                 str(jsonl(memes / "dev_seen.jsonl", rows)), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "hatefulmemes" / "0shot" / "metrics.json").read_text())
    assert m["predicted"] == 4 and 0 <= m["metrics"]["roc_auc"] <= 100
    assert "roc_auc 63.9 (validation set, ROC AUC)" in (out / "results.md").read_text()


def test_roc_auc_is_the_mann_whitney_statistic_with_ties_half():
    from kosmos.eval.kinds.ranked import roc_auc

    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's documented example
    assert roc_auc([1.0, 1.0], [0, 1]) == 0.5
    assert roc_auc([3.0, 1.0, 2.0], [1, 0, 0]) == 1.0
    with pytest.raises(ValueError, match="both labels"):
        roc_auc([1.0], [1])


# ----------------------------------------------------------------------------- WebSRC (extractive QA)


def websrc_folder(root: Path) -> Path:
    """WebSRC's layout: DOMAIN/NN/dataset.csv, processed_data/PAGE.html and .png, and
    dataset_split_release.json."""
    for domain, site, page in (("book", "01", "0100001"), ("auto", "03", "0300542")):
        d = root / domain / site
        (d / "processed_data").mkdir(parents=True)
        shutil.copy(PHOTOS[0], d / "processed_data" / f"{page}.png")
        (d / "processed_data" / f"{page}.html").write_text(
            "<html><head><title>Books</title><script>var x = 'hidden';</script></head><body><div tid='2'>"
            "The Tower of Nero</div><style>p {color: red}</style><p>Publication date: 10/06/2020</p>"
            "&amp; more</body></html>")
        prefix = domain[:2]
        (d / "dataset.csv").write_text(
            "question,id,element_id,answer_start,answer\n"
            f"When was The Tower of Nero published?,{prefix}{page}00000,130,1,10/06/2020\n"
            f"\"Who wrote it, then?\",{prefix}{page}00001,131,0,Rick Riordan\n")
    (root / "dataset_split_release.json").write_text(json.dumps({"dev": ["bo01"], "train": ["au03"]}))
    return root


def test_websrc_reads_its_release_layout_and_the_page_text(tmp_path):
    from kosmos.eval.datasets import EvalDataError, load_websrc

    root = websrc_folder(tmp_path / "websrc")
    dev = load_websrc(root, "dev")
    assert [q.id for q in dev] == ["bo010000100000", "bo010000100001"]
    assert dev[0].context == "Books The Tower of Nero Publication date: 10/06/2020 & more"  # no script/style
    assert dev[1].question == "Who wrote it, then?" and dev[1].answers == ["Rick Riordan"]
    assert dev[0].image.endswith("book/01/processed_data/0100001.png")
    assert [q.id[:2] for q in load_websrc(root)] == ["au", "au", "bo", "bo"]
    assert len(load_websrc(root / "auto" / "03" / "dataset.csv")) == 2
    with pytest.raises(EvalDataError,
                       match=r"dataset_split_release.json: split: no split 'test' \(it has dev"):
        load_websrc(root, "test")


def test_squad_normalisation_exact_match_and_f1():
    from kosmos.eval.kinds.extractive_qa import exact_match, f1_score, normalize_answer

    assert normalize_answer("  The Penguin-Books, Ltd.!") == "penguinbooks ltd"
    assert exact_match("Penguin Books Ltd.", "the penguin books ltd") == 1
    assert f1_score("Rick Riordan", "by Rick Riordan himself") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_score("", "") == 1.0 and f1_score("a", "") == 1.0  # "a" normalises to nothing
    assert f1_score("yes", "") == 0.0 and f1_score("yes", "no") == 0.0


def test_websrc_end_to_end_with_the_papers_prompt_and_a_long_page_cut_to_fit(ckpt, tmp_path):
    from kosmos.eval import main

    root = websrc_folder(tmp_path / "websrc")
    page = root / "book" / "01" / "processed_data" / "0100001.html"
    page.write_text("<p>" + "lots of page text " * 2000 + "</p>")  # far beyond the tiny model's context
    out = tmp_path / "out"
    assert main(["run", "--checkpoint", str(ckpt), "--task", "websrc", "--data", str(root), "--split", "dev",
                 "--out", str(out), "--max-new-tokens", "3", "--no-progress"]) == 0
    m = json.loads((out / "websrc" / "0shot" / "metrics.json").read_text())
    assert m["predicted"] == 2 and set(m["metrics"]) == {"exact_match", "f1", "n"}
    assert m["protocol"]["prompt"].startswith("{image}Given the context below from web page")
    lines = (out / "websrc" / "0shot" / "predictions.rank0.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert all(r["context_tokens_cut"] > 0 for r in recs)


def test_the_cross_modal_probes_fill_the_papers_prompts_from_their_rows(ckpt, tmp_path):
    from kosmos.eval import main
    from kosmos.eval.datasets import load_ranked

    colours = ["black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white",
               "yellow"]
    rows = [{"id": "sky", "object": "the sky", "choices": colours, "label": "blue"},
            {"id": "snow", "object": "snow", "choices": colours, "label": 9}]
    items = load_ranked("jsonl", jsonl(tmp_path / "colors.jsonl", rows))
    assert [x.label for x in items] == [1, 9] and items[0].fields == {"object": "the sky"}
    assert items[0].continuations[1] == " blue"
    sizes = [{"item1": "sofa", "item2": "cat", "choices": ["Yes", "No"], "label": 0},
             {"item1": "ant", "item2": "dog", "choices": ["Yes", "No"], "label": 1}]
    out = tmp_path / "out"
    for task, data in (("memorycolor", tmp_path / "colors.jsonl"),
                       ("relativesize", jsonl(tmp_path / "sizes.jsonl", sizes))):
        assert main(["run", "--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--out", str(out),
                     "--no-progress"]) == 0
        m = json.loads((out / task / "0shot" / "metrics.json").read_text())
        assert m["predicted"] == 2 and 0 <= m["metrics"]["acc"] <= 100


def test_a_probe_prompt_is_the_papers_text(ckpt, tmp_path):
    from kosmos.eval.run import Predictor, Shots, load_task_data
    from kosmos.eval.tasks import get_task
    from kosmos.generate import load_for_inference

    model, enc = load_for_inference(str(ckpt))
    spec = get_task("relativesize")
    data = load_task_data(spec, str(jsonl(tmp_path / "s.jsonl", [
        {"item1": "sofa", "item2": "cat", "choices": ["Yes", "No"], "label": 0}])))
    ctx = Predictor(model, enc, spec, data, Shots())
    q = ctx.kind.prompt(ctx, data.items[0])
    assert enc.tokenizer.decode(q["prompts"][0].ids).replace("<s>", "").strip() == "Is sofa larger than cat?"


def test_cub_puts_the_descriptions_before_the_image_and_ranks_the_names(ckpt, tmp_path):
    from kosmos.eval import main
    from kosmos.eval.datasets import load_ranked

    shutil.copy(PHOTOS[0], tmp_path / "bird.jpg")
    desc = {"three toed woodpecker": "It has black and white stripes throughout the body and a yellow crown.",
            "downy woodpecker": "It has white spots on its black wings and some red on its crown."}
    rows = [{"id": "b1", "image": "bird.jpg", "category": "the woodpecker", "descriptions": desc,
             "label": "downy woodpecker"},
            {"id": "b2", "image": "bird.jpg", "category": "the woodpecker", "descriptions": desc, "label": 0}]
    data = jsonl(tmp_path / "cub.jsonl", rows)
    item = load_ranked("described", data)[0]
    assert item.label == 1 and item.continuations == [" three toed woodpecker", " downy woodpecker"]
    assert item.contexts[0].startswith("Description of three toed woodpecker: It has black")
    assert item.images == [str(tmp_path / "bird.jpg")]
    out = tmp_path / "out"
    assert main(["run", "--checkpoint", str(ckpt), "--task", "cub", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "cub" / "0shot" / "metrics.json").read_text())
    assert m["predicted"] == 2 and "acc" in m["metrics"]


def test_cb_macro_f1_is_lm_evaluation_harness_cb_multi_fi():
    from kosmos.eval.kinds.ranked import macro_f1

    # per class: 0 -> tp 1, fp 1, fn 0: 2/3; 1 -> tp 1, fn 1: 2/3; 2 -> neither predicted nor true: 0
    assert macro_f1([0, 0, 1], [0, 1, 1], 3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert macro_f1([2, 2], [2, 2], 3) == pytest.approx(1 / 3)
