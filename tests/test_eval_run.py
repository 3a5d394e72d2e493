"""`python -m kosmos.eval run`: every task end to end on tiny fixture sets made from the shipped photos, with
a tiny random model: official result files, metrics, determinism, resume, skips, few-shot, 2 processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import PHOTOS, checkpoint_dir, launch, tiny_model

FAST = ["--no-progress", "--max-new-tokens", "4", "--metrics", "BLEU,ROUGE-L,CIDEr"]  # METEOR: ~13 s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    return checkpoint_dir(tmp_path_factory.mktemp("eval_run") / "run", tiny_tokenizer.path,
                          tiny_model(seed=3))


def make_sets(root: Path) -> dict[str, Path]:
    """Tiny benchmark files in the official formats, images from assets/images."""
    coco = root / "coco" / "val2014"
    coco.mkdir(parents=True)
    for i in range(1, 8):
        shutil.copy(PHOTOS[i], coco / f"COCO_val2014_{i:012d}.jpg")
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": i - 1, "cocoid": i,
         "split": "test" if i <= 4 else "train",
         "sentences": [{"raw": f"A photo number {i}."}, {"raw": f"Picture {i} of something."}]}
        for i in range(1, 8)]}
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": f"What is in picture {i}?", "question_id": 100 + i} for i in range(1, 5)]}
    answers = ["cat"] * 6 + ["a cat"] * 2 + ["dog"] * 2
    annotations = {"annotations": [
        {"question_id": 100 + i, "image_id": i, "answer_type": "other", "question_type": "what is",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                     for j, a in enumerate(answers)]}
        for i in range(1, 5)]}
    (root / "questions.json").write_text(json.dumps(questions))
    (root / "annotations.json").write_text(json.dumps(annotations))
    for c, name in enumerate(("cat", "rocket", "coffee cup")):
        d = root / "classes" / name.replace(" ", "_")
        d.mkdir(parents=True)
        for j in range(2):
            shutil.copy(PHOTOS[(3 * c + j) % len(PHOTOS)], d / f"{j}.jpg")
    imgs = root / "coco" / "val2014"
    choice = [{"id": f"c{i}", "images": [str(imgs / f"COCO_val2014_{i:012d}.jpg")],
               "text": "<image>This picture shows", "candidates": [" a cat.", " a rocket.", {
                   "text": " the same as <image>",
                   "images": [f"coco/val2014/COCO_val2014_{i + 1:012d}.jpg"]}],
               "answer": i % 3} for i in range(1, 4)]
    (root / "choice.jsonl").write_text("\n".join(json.dumps(r) for r in choice) + "\n")
    labels = [{"id": f"l{i}", "image": f"coco/val2014/COCO_val2014_{i:012d}.jpg", "labels": ["cat", "animal"]}
              for i in range(1, 4)]
    (root / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in labels) + "\n")
    return {"karpathy": root / "dataset_coco.json", "coco_root": root / "coco", "vqa_root": coco,
            "questions": root / "questions.json", "annotations": root / "annotations.json",
            "classes": root / "classes", "choice": root / "choice.jsonl", "labels": root / "labels.jsonl"}


@pytest.fixture()
def sets(tmp_path):
    return make_sets(tmp_path / "data")


def run(ckpt, *args) -> int:
    from kosmos.eval import main

    return main(["run", "--checkpoint", str(ckpt), *args])


def results(out: Path, task: str, shots: int = 0):
    folder = out / task / f"{shots}shot"
    return (json.loads((folder / "results.json").read_text()),
            json.loads((folder / "metrics.json").read_text()))


def test_captioning_writes_coco_results_metrics_and_a_table(ckpt, sets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]), "--images",
               str(sets["coco_root"]), "--out", str(out), "--num-beams", "2", *FAST) == 0
    res, metrics = results(out, "coco_captioning")
    assert sorted(r["image_id"] for r in res) == [1, 2, 3, 4]  # the test split, COCO ids
    assert all(isinstance(r["caption"], str) for r in res)
    m = metrics["metrics"]
    assert {"CIDEr", "BLEU-4", "ROUGE-L"} <= set(m) and metrics["predicted"] == 4
    assert metrics["paper"] == {"CIDEr": 84.7} and metrics["protocol"]["num_beams"] == 2
    table = (out / "results.md").read_text()
    assert "| coco_captioning | 0 | 4 |" in table and "CIDEr 84.7" in table
    last = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("{") and json.loads(line)["task"] == "coco_captioning" for line in last)

    # deterministic: the same predictions again, into another folder
    out2 = tmp_path / "out2"
    run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]),
        "--images", str(sets["coco_root"]),
        "--out", str(out2), "--num-beams", "2", *FAST)
    assert results(out2, "coco_captioning")[0] == res


def test_a_rerun_predicts_only_what_is_missing(ckpt, sets, tmp_path, monkeypatch):
    from kosmos.eval import run as run_mod

    out = tmp_path / "out"
    args = ["--task", "coco_captioning", "--data", str(sets["karpathy"]), "--images", str(sets["coco_root"]),
            "--out", str(out), "--batch-size", "1", *FAST]
    run(ckpt, *args)
    first, _ = results(out, "coco_captioning")
    pred_file = out / "coco_captioning" / "0shot" / "predictions.rank0.jsonl"
    lines = pred_file.read_text().splitlines()
    pred_file.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # two kept, a third cut by a "crash"
    seen = []
    original = run_mod.Predictor.__call__

    def counting(self, items):
        seen.extend(it.id for it in items)
        return original(self, items)

    monkeypatch.setattr(run_mod.Predictor, "__call__", counting)
    run(ckpt, *args)
    assert sorted(seen) == [3, 4]
    assert results(out, "coco_captioning")[0] == first


def test_a_missing_image_is_skipped_counted_and_named(ckpt, sets, tmp_path, caplog):
    (sets["coco_root"] / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]), "--images",
                   str(sets["coco_root"]), "--out", str(out), *FAST) == 0
    res, metrics = results(out, "coco_captioning")
    assert sorted(r["image_id"] for r in res) == [1, 3, 4]
    assert metrics["skipped"] == {"missing_image": 1}
    assert "COCO_val2014_000000000002.jpg" in caplog.text


def test_vqa_writes_question_ids_and_scores_accuracy(ckpt, sets, tmp_path):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]), "--annotations",
               str(sets["annotations"]), "--images", str(sets["vqa_root"]), "--out", str(out), *FAST) == 0
    res, metrics = results(out, "vqav2")
    assert sorted(r["question_id"] for r in res) == [101, 102, 103, 104]
    assert all("\n" not in r["answer"] for r in res)
    assert 0 <= metrics["metrics"]["accuracy"] <= 100 and "per_answer_type" in metrics["metrics"]
    # the rule is named in metrics.json and results.md, the paper's number with its convention
    assert metrics["metrics"]["rules"] == "lmms-eval" and metrics["protocol"]["vqa_rules"] == "lmms-eval"
    row = next(x for x in (out / "results.md").read_text().splitlines() if x.startswith("| vqav2 |"))
    assert "(lmms-eval rules)" in row and "accuracy 51.0 (EvalAI, test-dev)" in row
    assert metrics["paper_convention"] == "EvalAI, test-dev"
    assert run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]), "--annotations",
               str(sets["annotations"]), "--images", str(sets["vqa_root"]), "--out", str(tmp_path / "o17"),
               "--set", "vqa_rules=vqa2017", *FAST) == 0
    assert results(tmp_path / "o17", "vqav2")[1]["metrics"]["rules"] == "vqa2017"


def test_vqa_few_shot_prompts_carry_k_demonstrations_never_the_query(ckpt, sets):
    from kosmos.eval.run import Shots, load_task_data, query_text
    from kosmos.eval.tasks import get_task

    spec = get_task("vqav2")
    data = load_task_data(spec, str(sets["questions"]), str(sets["annotations"]), str(sets["vqa_root"]))
    shots = Shots(2, data.items, seed=5)
    for item in data.items:
        demos = shots.pick(item)
        assert len(demos) == 2 and item.id not in [d.id for d in demos]
        assert shots.pick(item) == demos  # seeded by the item: the same in any batch or process
        text, images = query_text(spec, item, demos)
        assert text.count("{image}") == 3 == len(images)
        assert text.count("Answer: cat") == 2  # the most common annotator answer of each demonstration
        assert text.endswith(f"Question: {item.fields['question']} Answer:")


def test_captioning_few_shot_runs_from_the_karpathy_train_split(ckpt, sets, tmp_path):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]), "--images",
               str(sets["coco_root"]), "--out", str(out), "--shots", "0,2", *FAST) == 0
    for k in (0, 2):
        res, metrics = results(out, "coco_captioning", k)
        assert len(res) == 4 and metrics["shots"] == k
    table = (out / "results.md").read_text()
    assert "| coco_captioning | 0 |" in table and "| coco_captioning | 2 |" in table


def test_the_bar_shows_on_a_terminal_only(ckpt, sets, tmp_path, monkeypatch):
    """Like every command's progress (kosmos.progress): a bar on a terminal, none in a log or a pipe (it
    wrote its carriage-return lines into logs)."""
    import sys

    from tests.helpers import Terminal

    fast = [a for a in FAST if a != "--no-progress"]
    for tty, folder in ((False, "log"), (True, "term")):
        err = Terminal()
        err.isatty = lambda tty=tty: tty
        monkeypatch.setattr(sys, "stderr", err)
        assert run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]), "--images",
                   str(sets["coco_root"]), "--out", str(tmp_path / folder), *fast) == 0
        assert ("coco_captioning 0-shot" in err.getvalue()) == tty, err.getvalue()


def test_retrieval_few_shot_picks_the_most_similar_support_image(ckpt, sets):
    from kosmos.eval.run import build_shots, load_task_data
    from kosmos.eval.tasks import get_task
    from kosmos.generate import load_for_inference

    model, enc = load_for_inference(str(ckpt))
    spec = get_task("coco_captioning")
    data = load_task_data(spec, str(sets["karpathy"]), images=str(sets["coco_root"]))
    shots = build_shots(model, enc, spec, data, 1, retrieval=True)
    # the support set is the evaluated items: a query's own image is the most similar, and is never picked
    picked = [shots.pick(item)[0].id for item in data.items]
    assert all(p != item.id for p, item in zip(picked, data.items, strict=True))
    assert shots.similar(data.items[0], 1) == [0]


@pytest.mark.parametrize("mode", ["constrained", "unconstrained"])
def test_zero_shot_classification(ckpt, sets, tmp_path, mode):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "imagenet", "--data", str(sets["classes"]), "--out", str(out), "--mode", mode,
               *FAST) == 0
    res, metrics = results(out, "imagenet")
    assert len(res) == 6
    assert 0 <= metrics["metrics"]["top1"] <= 100
    if mode == "constrained":
        assert all(r["prediction"] in ("cat", "rocket", "coffee cup") for r in res)
        assert all(len(r["top"]) == 3 for r in res)  # top-5 of three classes
    else:
        assert "top5" not in metrics["metrics"]


def test_multiple_choice_picks_the_candidate_with_the_highest_p_yes(ckpt, sets, tmp_path):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "choice", "--data", str(sets["choice"]), "--out", str(out), *FAST) == 0
    res, metrics = results(out, "choice")
    assert len(res) == 3 and all(r["prediction"] in (0, 1, 2) for r in res)
    recs = [json.loads(x)
            for x in (out / "choice" / "0shot" / "predictions.rank0.jsonl").read_text().splitlines()]
    assert all(r["prediction"] == max(range(3), key=r["scores"].__getitem__) for r in recs)
    assert "accuracy" in metrics["metrics"]


def test_open_vocabulary_labels(ckpt, sets, tmp_path):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "labels", "--data", str(sets["labels"]), "--out", str(out), "--set",
               "top_k=3", *FAST) == 0
    res, metrics = results(out, "labels")
    assert len(res) == 3 and all(isinstance(r["prediction"], list) and len(r["prediction"]) <= 3 for r in res)
    assert metrics["metrics"]  # exact (and semantic) precision/recall/F1


def test_predictions_only_over_a_folder_of_images(ckpt, sets, tmp_path):
    out = tmp_path / "out"
    assert run(ckpt, "--task", "captioning", "--data", str(sets["vqa_root"]), "--out", str(out), *FAST) == 0
    res, metrics = results(out, "captioning")
    assert len(res) == 7 and metrics["metrics"] == {}
    assert "(predictions only)" in (out / "results.md").read_text()


def test_captioning_over_caption_shards_scores_against_their_captions(ckpt, tmp_path):
    from tests.helpers import caption_shards

    shards = caption_shards(tmp_path / "cap", 1, 5)
    out = tmp_path / "out"
    assert run(ckpt, "--task", "captioning", "--data", shards[0], "--out", str(out), *FAST) == 0
    res, metrics = results(out, "captioning")
    assert len(res) == 5 and "CIDEr" in metrics["metrics"]


def test_bad_input_is_one_line_naming_the_file(ckpt, sets, tmp_path, capsys):
    sets["annotations"].write_text('{"annotations": [{"question_id": 101}]}')
    with pytest.raises(SystemExit) as e:
        run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]),
            "--annotations", str(sets["annotations"]),
            "--images", str(sets["vqa_root"]), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "annotations.json" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        run(ckpt, "--task", "coco_captioning", "--data", str(tmp_path / "nope.json"),
            "--out", str(tmp_path / "o"))
    assert e.value.code == 2 and "nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(ckpt, "--task", "imagenet", "--data", str(sets["classes"]), "--shots", "2",
            "--out", str(tmp_path / "o"))
    assert e.value.code == 2 and "few-shot" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]), "--set", "beams=3")
    assert e.value.code == 2 and "beams" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]), "--set", "vqa_rules=evalai")
    assert e.value.code == 2 and "unknown vqa_rules 'evalai'; vqa_rules: vqa2017 |" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_predictions_and_metrics_of_one(ckpt, sets, tmp_path):
    args = ["--checkpoint", str(ckpt), "--task", "vqav2", "--data", str(sets["questions"]), "--annotations",
            str(sets["annotations"]), "--images", str(sets["vqa_root"]), "--batch-size", "1", *FAST]
    one = tmp_path / "one"
    run(ckpt, *args[2:], "--out", str(one))
    two = tmp_path / "two"
    launch(2, ["-m", "kosmos.eval", "run"], [*args, "--out", str(two)], timeout=600, cwd=tmp_path)  # DETAIL
    files = sorted(p.name for p in (two / "vqav2" / "0shot").glob("predictions.*.jsonl"))
    assert files == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"]  # both processes worked
    assert results(two, "vqav2") [0] == results(one, "vqav2")[0]
    assert results(two, "vqav2")[1]["metrics"] == results(one, "vqav2")[1]["metrics"]


def test_train_eval_tasks_are_checked_with_the_key_named():
    from kosmos.config import ConfigError
    from tests.helpers import tiny_config

    cfg = tiny_config("train.eval_tasks=[{task: coco_captioning, data: x.json, limit: 5, num_beams: 2}]")
    assert cfg.train.eval_tasks[0]["num_beams"] == 2
    for bad, words in (("[{task: cocoo, data: x}]", "train.eval_tasks[0].task"),
                       ("[{task: vqav2}]", "needs task and data"),
                       ("[{task: vqav2, data: x, beams: 2}]", "beams"),
                       ("[{task: vqav2, data: x, shots: [0, 4]}]", "shots"),
                       ("[{task: vqav2, data: x, vqa_rules: evalai}]",
                        "eval_tasks[0].vqa_rules': must be one of vqa2017")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            tiny_config(f"train.eval_tasks={bad}")


@pytest.mark.slow
def test_training_runs_its_eval_tasks_and_logs_their_metrics(tiny_run, tmp_path, capsys):
    import train_kosmos
    from kosmos.config import load_config
    from tests.helpers import TINY

    captions = next(o.split("=", 1)[1] for o in tiny_run if o.startswith("data.captions.shards="))
    shard = sorted(Path(captions.strip("[]")).glob("*.tar"))[0]
    out = tmp_path / "run"
    task = f"[{{task: captioning, data: '{shard}', limit: 3, max_new_tokens: 3, metrics: [BLEU, CIDEr]}}]"
    cfg = load_config(TINY, [*tiny_run, f"train.output_dir={out}", "train.max_steps=2",
                             "optim.total_steps=30",
                             "optim.warmup_steps=5", "train.eval_every=2", f"train.eval_tasks={task}",
                             "data.text.tokens_per_step=0", "data.interleaved.tokens_per_step=0",
                             "data.captions.workers=0"])
    train_kosmos.train(cfg)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("eval "))
    assert "captioning/CIDEr" in line and "captioning/BLEU-4" in line
    res = json.loads((out / "eval" / "step_00000002" / "captioning" / "0shot" / "results.json").read_text())
    assert len(res) == 3


def test_score_on_the_run_results_gives_the_run_metrics(ckpt, sets, tmp_path, capsys):
    from kosmos.eval import main

    out = tmp_path / "out"
    run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]), "--annotations", str(sets["annotations"]),
        "--images", str(sets["vqa_root"]), "--out", str(out), *FAST)
    run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]),
        "--images", str(sets["coco_root"]),
        "--out", str(out), *FAST)
    for task, value in (("vqav2", "cat"), ("coco_captioning", "a photo number 2")):
        path = out / task / "0shot" / "predictions.rank0.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        for r in recs[:2]:  # known right answers, so that the metrics are not all 0
            r["prediction"] = value
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = ["--out", str(out), *FAST]  # a rerun predicts nothing more and scores the edited predictions
    run(ckpt, "--task", "vqav2", "--data", str(sets["questions"]), "--annotations", str(sets["annotations"]),
        "--images", str(sets["vqa_root"]), *args)
    run(ckpt, "--task", "coco_captioning", "--data", str(sets["karpathy"]),
        "--images", str(sets["coco_root"]),
        *args)
    assert results(out, "vqav2")[1]["metrics"]["accuracy"] >= 50
    assert results(out, "coco_captioning")[1]["metrics"]["CIDEr"] > 0
    capsys.readouterr()
    folder = out / "vqav2" / "0shot"
    assert main(["score", "vqa", "--questions", str(sets["questions"]),
                 "--annotations", str(sets["annotations"]),
                 "--predictions", str(folder / "results.json")]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["accuracy"] == results(out, "vqav2")[1]["metrics"]["accuracy"]
    folder = out / "coco_captioning" / "0shot"
    assert main(["score", "captioning", "--annotations", str(sets["karpathy"]), "--predictions",
                 str(folder / "results.json"), "--no-meteor"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["CIDEr"] == results(out, "coco_captioning")[1]["metrics"]["CIDEr"]


def test_an_evaluation_image_folder_takes_every_image_the_converters_take(tmp_path):
    """Issue 22: GIF and TIFF images, which the converters take, were skipped silently by an evaluation image
    folder (jpg/jpeg/png/webp/bmp only): one list of image suffixes now."""
    from PIL import Image

    import kosmos.data.format
    import kosmos.data_tools.images
    import kosmos.eval.datasets
    from kosmos.eval import run
    from kosmos.eval.tasks import get_task

    with Image.open(PHOTOS[0]) as im:
        im = im.convert("RGB").resize((40, 32))
        for suffix, fmt in ((".jpg", "JPEG"), (".gif", "GIF"), (".tif", "TIFF"), (".TIFF", "TIFF"),
                            (".webp", "WEBP"), (".bmp", "BMP")):
            im.save(tmp_path / f"im{suffix}", format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    data = run.load_task_data(get_task("captioning"), str(tmp_path))
    assert sorted(item.id for item in data.items) == ["im.TIFF", "im.bmp", "im.gif", "im.jpg", "im.tif",
                                                      "im.webp"]
    from kosmos.image import load_image

    assert all(load_image(item.images[0], 32).shape == (3, 32, 32) for item in data.items)
    suffixes = getattr(kosmos.data.format, "IMAGE_SUFFIXES", None)
    assert kosmos.data_tools.images.IMAGE_SUFFIXES is suffixes is kosmos.eval.datasets.IMAGE_SUFFIXES


# ----------------------------------------------------------------------------- issue 22 items 7 and 9


def test_a_decompression_bomb_is_skipped_counted_and_named_on_every_run(ckpt, sets, tmp_path, caplog):
    from tests.helpers import bomb_png, caption_shards, write_tar

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        shutil.copy(PHOTOS[i], folder / f"p{i}.jpg")
    (folder / "bomb.png").write_bytes(bomb_png(30_000, 30_000))  # PIL: DecompressionBombError
    (folder / "big.png").write_bytes(bomb_png(10_000, 10_000))  # PIL: a warning, then 100 M pixels
    out = tmp_path / "out"
    for _ in range(2):  # the rerun tries the skipped images again, and skips them again
        with caplog.at_level("WARNING"):
            assert run(ckpt, "--task", "captioning", "--data", str(folder), "--out", str(out), *FAST) == 0
        res, metrics = results(out, "captioning")
        assert sorted(r["image_id"] for r in res) == ["p0.jpg", "p1.jpg"]
        assert metrics["skipped"] == {"decompression_bomb": 2}
        assert "bomb.png" in caplog.text and "big.png" in caplog.text
        caplog.clear()
    # the same image inside a caption shard
    shard = caption_shards(tmp_path / "cap", 1, 2)[0]
    bombs = write_tar(tmp_path / "bombs.tar", [{"__key__": "b0", "png": bomb_png(30_000, 30_000),
                                                "txt": b"a bomb"}])
    out = tmp_path / "out2"
    for data in (shard, str(bombs)):
        assert run(ckpt, "--task", "captioning", "--data", data, "--out", str(out / Path(data).stem),
                   *FAST) == 0
    assert results(out / "bombs", "captioning")[1]["skipped"] == {"decompression_bomb": 1}


def _error(capsys, ckpt, *args) -> str:
    with pytest.raises(SystemExit) as e:
        run(ckpt, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_prompt_jsonl_is_one_line_naming_the_file_line_and_field(ckpt, sets, tmp_path, capsys):
    image = str(sets["vqa_root"] / "COCO_val2014_000000000001.jpg")
    path = tmp_path / "prompts.jsonl"
    cases = [
        ([{"image": 123}], ["prompts.jsonl:1", "image", "expected str"]),
        ([{"image": image, "captions": 7}], ["prompts.jsonl:1", "captions"]),
        ([{"id": "1", "image": image}, {"id": "1", "image": image}], ["prompts.jsonl:2", "id", "'1'",
                                                                        "prompts.jsonl:1"]),
        ([{"id": [1], "image": image}], ["prompts.jsonl:1", "id"]),
    ]
    for rows, words in cases:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        err = _error(capsys, ckpt, "--task", "captioning", "--data", str(path), "--out", str(tmp_path / "o"))
        assert all(w in err for w in words), (words, err)
    path.write_text(json.dumps({"image": image, "question": ["what?"]}) + "\n")
    err = _error(capsys, ckpt, "--task", "vqa", "--data", str(path), "--out", str(tmp_path / "o"))
    assert "prompts.jsonl:1" in err and "question" in err
    path.write_bytes(json.dumps({"image": image}).encode() + b'\n{"image": "caf\xe9.jpg"}\n')
    err = _error(capsys, ckpt, "--task", "captioning", "--data", str(path), "--out", str(tmp_path / "o"))
    assert "prompts.jsonl:2" in err and "UTF-8" in err
    # the benchmark JSONL readers name the line too
    sets["labels"].write_bytes(sets["labels"].read_bytes() + b'{"id": "x\xff"}\n')
    err = _error(capsys, ckpt, "--task", "labels", "--data", str(sets["labels"]),
                 "--out", str(tmp_path / "o"))
    assert "labels.jsonl:4" in err and "UTF-8" in err


def test_items_with_the_same_id_are_refused_naming_them(ckpt, sets, tmp_path, capsys):
    from tests.helpers import caption_shards

    for name in ("labels", "choice"):
        first = sets[name].read_text().splitlines()[0]
        sets[name].write_text(sets[name].read_text() + first + "\n")
        err = _error(capsys, ckpt, "--task", name, "--data", str(sets[name]), "--out", str(tmp_path / "o"))
        assert f"{sets[name].name}:4" in err and "id" in err and f"{sets[name].name}:1" in err, err
    a, b = caption_shards(tmp_path / "cap", 2, 2)  # two shards of the same keys
    Path(b).rename(tmp_path / "cap" / "cap-000001.tar")
    shutil.copy(a, tmp_path / "cap" / "cap-000001.tar")
    err = _error(capsys, ckpt, "--task", "captioning", "--data", str(tmp_path / "cap"), "--out",
                 str(tmp_path / "o"))
    assert "same id 'c00_000'" in err


def test_limit_is_a_number_of_items_from_one(ckpt, sets, tmp_path, capsys):
    for bad in ("-1", "0"):
        err = _error(capsys, ckpt, "--task", "captioning", "--data", str(sets["vqa_root"]), "--limit", bad,
                     "--out", str(tmp_path / "o"))
        assert f"--limit {bad}" in err
    out = tmp_path / "out"
    assert run(ckpt, "--task", "captioning", "--data", str(sets["vqa_root"]), "--limit", "2",
               "--out", str(out), *FAST) == 0
    assert results(out, "captioning")[1]["predicted"] == 2


def test_train_eval_tasks_limit_is_checked():
    from kosmos.config import ConfigError
    from tests.helpers import tiny_config

    for bad in (0, -1, "x"):
        with pytest.raises(ConfigError, match=r"train.eval_tasks\[0\].limit"):
            tiny_config(f"train.eval_tasks=[{{task: coco_captioning, data: x.json, limit: {bad}}}]")


def test_every_number_says_where_it_came_from_and_another_model_is_refused(ckpt, sets, tmp_path, capsys,
                                                                           tiny_tokenizer):
    """metrics.json and provenance.json hold the checkpoint (path, step, sha256 of the weights), the full
    protocol, the scorer and the project's version; every prediction record the weights' tag; results.md the
    model. A second run into the folder with other weights or another protocol is refused in one line; the
    same run continues. `compare` puts two folders side by side with the paper's numbers."""
    import hashlib

    from kosmos.eval import main

    out = tmp_path / "out"
    args = ["--task", "coco_captioning", "--data", str(sets["karpathy"]), "--images", str(sets["coco_root"]),
            *FAST]
    assert run(ckpt, *args, "--out", str(out)) == 0
    folder = out / "coco_captioning" / "0shot"
    _, metrics = results(out, "coco_captioning")
    sha = hashlib.sha256(b"model.safetensors\0" + (ckpt / "model.safetensors").read_bytes()).hexdigest()
    prov = metrics["provenance"]
    # {} state: no step
    assert prov["checkpoint"] == {"path": str(ckpt.resolve()), "step": None, "sha256": sha}
    assert prov["protocol"]["prompt"] == metrics["protocol"]["prompt"] and prov["protocol"]["shots"] == 0
    assert prov["protocol"]["seed"] == 0 and prov["protocol"]["retrieval"] is False
    assert prov["scorer"]["kind"] == "captioning" and "pycocoevalcap" in prov["scorer"]["packages"]
    assert set(prov["kosmos"]) == {"version", "commit"}
    assert json.loads((folder / "provenance.json").read_text()) == prov
    records = [json.loads(line) for line in (folder / "predictions.rank0.jsonl").read_text().splitlines()]
    assert records and all(r["model"] == f"{sha[:12]}@None" for r in records)
    assert f"sha256 {sha[:8]}" in (out / "results.md").read_text()

    assert run(ckpt, *args, "--out", str(out)) == 0  # the same weights and protocol: continues
    capsys.readouterr()
    assert run(ckpt, *args, "--out", str(out), "--max-new-tokens", "5") == 2  # another protocol
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another checkpoint or protocol" in err, err
    assert "protocol.max_new_tokens: 4 -> 5" in err
    other = checkpoint_dir(tmp_path / "other", tiny_tokenizer.path, tiny_model(seed=4))
    assert run(other, *args, "--out", str(out)) == 2  # other weights
    assert "checkpoint.sha256" in capsys.readouterr().err

    out2 = tmp_path / "out2"
    assert run(other, *args, "--out", str(out2)) == 0
    capsys.readouterr()
    assert main(["compare", str(out), str(out2)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| task | shots | metric | out (") and table[0].endswith("| KOSMOS-1 paper |")
    cider = next(line for line in table if "| CIDEr |" in line)
    assert cider.startswith("| coco_captioning | 0 | CIDEr | ") and cider.endswith("| 84.7 |")
    assert main(["compare", str(tmp_path / "nothing")]) == 2  # one line, not a traceback
    assert "no TASK/Kshot/metrics.json" in capsys.readouterr().err
