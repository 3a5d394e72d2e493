"""Evaluation by task kind (issue 21 item 4): a kind is one handler (`kosmos.eval.kinds`), the runner has no
chain of kinds, a kind registered from outside runs end to end, the config checks `train.eval_tasks` with
names of its own that agree with the evaluation's, and the CLI's setting flags come from TaskSpec's fields."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PHOTOS, ROOT, checkpoint_dir, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    return checkpoint_dir(tmp_path_factory.mktemp("eval_kinds") / "run", tiny_tokenizer.path,
                          tiny_model(seed=3))


def test_the_runner_asks_the_kind_instead_of_testing_it():
    """A chain of `if kind == ...` (there were about 25 tests of the kind in run.py) is what the kinds
    replace: a new kind must not need an edit of the runner."""
    chain = re.compile(r"\bkind\s*(==|!=)|\bkind\s+(not\s+)?in\s*[(\[{]")
    for name in ("run.py", "prompts.py", "rices.py", "datasets.py"):
        text = (ROOT / "kosmos" / "eval" / name).read_text()
        assert not chain.findall(text), f"kosmos/eval/{name} tests a task's kind; ask kosmos.eval.kinds"
    assert not chain.findall((ROOT / "kosmos" / "train_eval.py").read_text())


def test_every_builtin_kind_is_registered_with_the_whole_interface():
    from kosmos.eval.kinds import KINDS, TaskKind, get_kind
    from kosmos.eval.tasks import TASKS

    assert {spec.kind for spec in TASKS.values()} <= set(KINDS)
    assert set(KINDS) >= {"captioning", "vqa", "classification", "choice", "labels"}
    for name, kind in KINDS.items():
        assert isinstance(kind, TaskKind) and kind.name == name
        for method in ("read", "predict", "score"):  # the ones without a default
            assert getattr(type(kind), method) is not getattr(TaskKind, method), (name, method)
    with pytest.raises(ValueError, match=r"unknown task kind 'nope'; kinds: .*captioning"):
        get_kind("nope")


def test_a_kind_registered_from_outside_runs_end_to_end(ckpt, tmp_path, monkeypatch):
    """The recipe of kosmos/eval/kinds/__init__.py: a TaskKind subclass with @register is all a kind needs
    for load_task_data, build_shots and run_task (results.json, metrics.json, results.md)."""
    from kosmos.eval import kinds
    from kosmos.eval.datasets import Item, TaskData, read_jsonl
    from kosmos.eval.run import Shots, build_shots, load_task_data, run_task
    from kosmos.eval.tasks import TaskSpec
    from kosmos.generate import load_for_inference

    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))  # the registration ends with the test

    @kinds.register
    class Exact(kinds.TaskKind):
        name = "exact_test"

        def read(self, spec, data, annotations, images, split, classnames):
            return TaskData([Item(id=row["id"], images=[row["image"]], references=[row["answer"]])
                             for _, row in read_jsonl(data)], id_key="id")

        def predict(self, ctx, items, prompts):
            return [{"id": it.id, "prediction": text}
                    for it, text in zip(items, ctx.generate(prompts), strict=True)]

        def official_result(self, data, item, record):
            return {"id": item.id, "said": record["prediction"]}

        def score(self, spec, items, records):
            right = sum(records[it.key]["prediction"] == it.references[0] for it in items)
            return {"exact": 100 * right / len(items), "n": len(items)}

    rows = [{"id": f"e{i}", "image": str(PHOTOS[i]), "answer": "a cat"} for i in range(3)]
    path = tmp_path / "exact.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TaskSpec("exact_test", prompt="{image}Say:", max_new_tokens=3, batch_size=2)
    data = load_task_data(spec, str(path))
    assert [it.id for it in data.items] == ["e0", "e1", "e2"]
    model, enc = load_for_inference(str(ckpt))
    with pytest.raises(ValueError,
                       match="few-shot is for captioning, ranked_choice and vqa tasks, not exact_test"):
        build_shots(model, enc, spec, data, 2)
    res = run_task(model, enc, "exact_task", spec, data, tmp_path / "out", Shots(), progress=False)
    assert res.predicted == 3 and res.metrics["n"] == 3 and 0 <= res.metrics["exact"] <= 100
    results = json.loads((res.folder / "results.json").read_text())
    assert [r["id"] for r in results] == ["e0", "e1", "e2"]
    assert all(isinstance(r["said"], str) for r in results)
    assert json.loads((res.folder / "metrics.json").read_text())["metrics"]["exact"] == res.metrics["exact"]
    assert "| exact_task | 0 | 3 |" in (tmp_path / "out" / "results.md").read_text()


# ----------------------------------------------------------------------------- the config's side


def test_the_configs_eval_names_agree_with_the_evaluation():
    """kosmos.config checks train.eval_tasks without importing the evaluation, by names of its own."""
    from kosmos import config
    from kosmos.eval import vqa_metrics
    from kosmos.eval.tasks import TASKS, TaskSpec

    assert config.EVAL_TASK_NAMES == tuple(TASKS)
    assert config.EVAL_TASK_SETTINGS == tuple(f.name for f in dataclasses.fields(TaskSpec))
    assert vqa_metrics.VQA_RULES is config.VQA_RULES
    assert vqa_metrics.DEFAULT_RULES in config.VQA_RULES
    for rule in config.VQA_RULES:  # each name is a rule vqa_metrics has
        assert vqa_metrics.vqa_accuracy("2", ["2"] * 10, rules=rule) == 1.0
    options = {f.name for f in dataclasses.fields(config.EvalTaskConfig)} - {"settings"}
    assert options == set(config.EVAL_TASK_OPTIONS)


def test_checking_eval_tasks_imports_no_evaluation():
    code = ("import sys; from kosmos.config import load_config; "
            "cfg = load_config(None, ['train.eval_tasks=[{task: vqav2, data: q.json, num_beams: 2}]']); "
            "assert cfg.train.eval_tasks[0]['num_beams'] == 2; "
            "print(sorted(m for m in sys.modules if m.startswith('kosmos.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_eval_task_config_is_typed_and_checked():
    from kosmos.config import ConfigError, EvalTaskConfig

    t = EvalTaskConfig.from_dict({"task": "vqav2", "data": "q.json", "annotations": "a.json", "shots": 2,
                                  "retrieval": True, "num_beams": 3, "stop": [".", "?"]})
    assert (t.task, t.data, t.annotations, t.shots, t.retrieval, t.limit, t.split) == (
        "vqav2", "q.json", "a.json", 2, True, 200, "test")
    assert t.settings == {"num_beams": 3, "stop": [".", "?"]}
    for bad, words in (({"data": 5}, "train.eval_tasks[0].data': must be a string"),
                       ({"images": ["a", "b"]}, "train.eval_tasks[0].images': must be a string"),
                       ({"retrieval": "false"}, "train.eval_tasks[0].retrieval': must be true or false"),
                       ({"seed": 1.5}, "train.eval_tasks[0].seed': must be a whole number")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            EvalTaskConfig.from_dict({"task": "vqav2", "data": "q.json", **bad})


# ----------------------------------------------------------------------------- the command line


def test_every_task_setting_is_a_flag_and_beams_is_spelled_as_in_generate(tmp_path, capsys):
    import argparse

    from kosmos.eval.run import NOT_FLAGS, _settings, add_setting_flags
    from kosmos.eval.tasks import TaskSpec

    ap = argparse.ArgumentParser()
    add_setting_flags(ap)
    ap.add_argument("--set", action="append", default=[])
    flags = {a.dest: a.option_strings for a in ap._actions}
    for f in dataclasses.fields(TaskSpec):
        assert (f.name in flags) != (f.name in NOT_FLAGS), f.name
    assert flags["num_beams"] == ["--beams", "--num-beams"]
    for beams in ("--beams", "--num-beams"):
        assert _settings(ap.parse_args([beams, "3"])) == {"num_beams": 3}
    got = _settings(ap.parse_args(["--metrics", "BLEU,CIDEr", "--metrics", "ROUGE-L", "--stop", "\\n",
                                   "--prompt", "{image}Q:\\n", "--vqa-rules", "vqa2017", "--set", "top_k=2"]))
    assert got == {"metrics": ["BLEU", "CIDEr", "ROUGE-L"], "stop": ["\n"], "prompt": "{image}Q:\n",
                   "vqa_rules": "vqa2017", "top_k": 2}

    from kosmos.eval import main

    for beams in ("--beams", "--num-beams"):  # refused before any model is loaded
        with pytest.raises(SystemExit) as e:
            main(["run", "--checkpoint", str(tmp_path), "--task", "captioning", "--data", str(tmp_path),
                  beams, "0"])
        assert e.value.code == 2 and "num_beams must be a whole number >= 1, got 0" in capsys.readouterr().err
    from kosmos.generate import main as generate

    with pytest.raises(SystemExit) as e:
        generate(["--config", str(ROOT / "configs" / "tiny.yaml"), "--num-beams", "0"])
    assert e.value.code == 2 and "--beams 0: must be" in capsys.readouterr().err


def test_the_kinds_package_says_how_to_add_a_kind():
    import kosmos.eval.kinds

    doc = kosmos.eval.kinds.__doc__
    assert "@register" in doc and "EVAL_TASK_NAMES" in doc
    assert Path(kosmos.eval.kinds.__file__).name == "__init__.py"


def test_training_eval_tasks_take_their_support_set_as_the_cli_does(ckpt, tmp_path):
    """One support-set path: a few-shot `train.eval_tasks` entry on a Karpathy file draws its demonstrations
    from the train split, as `python -m kosmos.eval run --shots` does (it drew them from the evaluated
    items)."""
    from kosmos import train_eval
    from kosmos.config import EvalTaskConfig
    from kosmos.eval.run import load_support
    from kosmos.eval.tasks import get_task
    from kosmos.generate import load_for_inference
    from tests.test_eval_run import make_sets

    sets = make_sets(tmp_path / "data")
    spec = get_task("coco_captioning")
    support = load_support(spec, str(sets["karpathy"]), images=str(sets["coco_root"]))
    assert [s.id for s in support] == [5, 6, 7]
    assert load_support(spec, str(sets["vqa_root"])) is None  # a folder of images: the evaluated items
    task = EvalTaskConfig(task="coco_captioning", data=str(sets["karpathy"]), images=str(sets["coco_root"]),
                          shots=1, limit=2, settings={"max_new_tokens": 2, "metrics": ["BLEU"]})
    model, enc = load_for_inference(str(ckpt))
    model.train()
    results = train_eval.evaluate_tasks(None, [task], model, enc, tmp_path / "out")
    assert model.training  # put back as it was
    assert "eval/coco_captioning_1shot/BLEU-4" in results
    data = next(d for k, d in train_eval._TRAIN_DATA.items() if str(sets["karpathy"]) in k)
    assert [s.id for s in data.support] == [5, 6, 7]
