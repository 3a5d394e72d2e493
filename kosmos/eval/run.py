"""Run a benchmark task on a model: predictions in the official formats, metrics, a markdown table.

    python -m kosmos.eval run --checkpoint runs/kosmos --task coco_captioning \\
        --data karpathy/dataset_coco.json --images coco/ --shots 0,4 --out results/

Batched, distributed (each process takes every N-th batch of a fixed global batching, so N processes
give exactly the predictions of one), resumable (predictions are appended to
`OUT/TASK/Kshot/predictions.rankR.jsonl` batch by batch; a rerun skips the ids already there), with a
progress bar. An item whose image is missing or unreadable is skipped, counted and named. When the data
has references the predictions are scored (`kosmos.eval.caption_metrics`, `vqa_metrics`,
`label_metrics`); without them (a folder of images, a shard set, a JSONL of prompts) only predictions are
written. Protocols: `kosmos.eval.tasks`; what depends on the task's kind (reading, prompts, generation or
ranking, result format, metrics): `kosmos.eval.kinds`; readers: `kosmos.eval.datasets`; RICES:
`kosmos.eval.rices`. During training, `kosmos.train_eval` runs `train.eval_tasks` through `run_task`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kosmos.eval.datasets import EvalDataError, Item, TaskData, id_text, unique_ids
from kosmos.eval.kinds import KINDS, get_kind
from kosmos.eval.prompts import ImageLoader, Shots, Skip, fill, query_text
from kosmos.eval.tasks import PAPER, PAPER_CONVENTIONS, TaskSpec
from kosmos.untrusted import load_json

log = logging.getLogger(__name__)

__all__ = ["ImageLoader", "Item", "Predictor", "RunResult", "Shots", "Skip", "TaskData", "build_shots",
           "fill", "load_support", "load_task_data", "main", "markdown_table", "official_results",
           "query_text", "read_predictions", "run_task", "score"]


def load_task_data(spec: TaskSpec, data: str, annotations: str | None = None, images: str | None = None,
                   split: str = "test", classnames: str | None = None) -> TaskData:
    """The items of a task from `data`, read by its kind (`kosmos.eval.kinds`): the benchmark's own files
    (see `kosmos.eval.datasets`), or for captioning and VQA also a folder of images, a JSONL of prompts, or
    caption shards (predictions only, unless they carry references). Two items with the same id are an
    EvalDataError naming them: predictions are kept by id, so one of them would be dropped without a word."""
    return unique_ids(get_kind(spec.kind).read(spec, data, annotations, images, split, classnames), data)


# ----------------------------------------------------------------------------- predicting


class Predictor:
    """Predictions for batches of items of one task (the model is used as it is: eval mode, its device).
    The task's kind makes the prompts and asks the model (`kosmos.eval.kinds.TaskKind`); this is the context
    it works in."""

    def __init__(self, model, encoder, spec: TaskSpec, data: TaskData, shots: Shots):
        from kosmos.generate import GenerationConfig

        self.model, self.encoder, self.spec, self.data, self.shots = model, encoder, spec, data, shots
        self.kind = get_kind(spec.kind)
        self.generates = self.kind.generates(spec)
        """Whether predictions are generated (`kosmos.generate`, capped at the model's context)."""
        self.load = ImageLoader(encoder)
        self.gen = GenerationConfig.for_tokenizer(encoder.tokenizer, num_beams=spec.num_beams,
                                                  max_new_tokens=spec.max_new_tokens,
                                                  length_penalty=spec.length_penalty, stop=list(spec.stop))
        self.state = self.kind.prepare(self)

    def __call__(self, items: list[Item]) -> list[dict]:
        """One record per item: {"id", "prediction", ...} or {"id", "skipped": reason, "path"}."""
        records: list[dict | None] = [None] * len(items)
        prompts, where = [], []
        for i, item in enumerate(items):
            try:
                prompts.append(self.kind.prompt(self, item))
                where.append(i)
            except Skip as s:
                records[i] = {"id": item.id, "skipped": s.reason, "path": s.path}
        if prompts:
            predicted = self.kind.predict(self, [items[i] for i in where], prompts)
            for i, rec in zip(where, predicted, strict=True):
                records[i] = rec
        return records  # type: ignore[return-value]

    def generate(self, prompts: list) -> list[str]:
        """The generated texts, cut at the task's stop strings and stripped."""
        from kosmos.generate import cut_at_stop, generate

        outs = generate(self.model, prompts, self.gen)
        return [cut_at_stop(self.encoder.tokenizer.decode(ids), self.spec.stop).strip() for ids in outs]


# ----------------------------------------------------------------------------- files


def read_predictions(folder: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """From `folder`'s predictions.*.jsonl: every prediction record by id, and each id's last skip reason
    (skipped items have no prediction: a rerun tries them again). A line cut by a crash is ignored."""
    done: dict[str, dict] = {}
    skips: dict[str, str] = {}
    for path in sorted(folder.glob("predictions.*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = load_json(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run
                if "prediction" in rec:
                    done[id_text(rec["id"])] = rec
                if "skipped" in rec:
                    skips[id_text(rec["id"])] = rec["skipped"]
    return done, skips


def official_results(spec: TaskSpec, data: TaskData, preds: dict[str, dict]) -> list[dict]:
    """The predictions in the benchmark's results format, by the task's kind: COCO `[{"image_id",
    "caption"}]`, VQA `[{"question_id", "answer"}]` (VizWiz `{"image", "answer"}`), else `[{"id",
    "prediction"}]`."""
    kind = get_kind(spec.kind)
    return [kind.official_result(data, item, preds[item.key]) for item in data.items if item.key in preds]


def score(spec: TaskSpec, data: TaskData, preds: dict[str, dict]) -> dict[str, float]:
    """The task's metrics (by its kind) over the predicted items that have references ({} when none has)."""
    kind = get_kind(spec.kind)
    scored = [it for it in data.items if it.key in preds and kind.has_reference(it)]
    if not scored:
        return {}
    return kind.score(spec, scored, {it.key: preds[it.key] for it in scored})


def markdown_table(out: Path) -> str:
    """Every metrics.json under `out` as one markdown table, with the paper's numbers beside: VQA scores name
    their rule (`vqa_rules`), the paper's the convention it is known to use."""
    rows = []
    for path in sorted(out.glob("*/*shot/metrics.json")):
        m = json.loads(path.read_text())
        main = {k: v for k, v in m["metrics"].items() if isinstance(v, (int, float)) and k != "n"}
        paper = PAPER.get((m["task"], m["shots"]), {})
        cells = ", ".join(f"{k} {v:.1f}" for k, v in main.items()) or "(predictions only)"
        if "rules" in m["metrics"]:
            cells += f" ({m['metrics']['rules']} rules)"
        ref = ", ".join(f"{k} {v}" for k, v in paper.items()) or "-"
        if paper and m["task"] in PAPER_CONVENTIONS:
            ref += f" ({PAPER_CONVENTIONS[m['task']]})"
        skipped = sum(m.get("skipped", {}).values())
        rows.append(f"| {m['task']} | {m['shots']} | {m['predicted']} | {skipped} | {cells} | {ref} "
                    f"| {_model_cell(m)} |")
    head = ("| task | shots | predicted | skipped | metrics | KOSMOS-1 paper | model |\n"
            "|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- provenance


PROVENANCE = "provenance.json"
"""Beside a task's predictions: what they were computed from (`provenance`). A run into a folder whose
provenance is another checkpoint or protocol is refused; the same one continues it."""


def project_version() -> dict[str, str | None]:
    """The project's version (the installed package's) and, in a git checkout, its commit (read from .git,
    no command run)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("kosmos-pretrain")
    except PackageNotFoundError:
        v = None
    commit = None
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        commit = (git / head[5:]).read_text().strip() if head.startswith("ref: ") else head
    except OSError:
        pass
    return {"version": v, "commit": commit}


def scorer_info(spec: TaskSpec) -> dict[str, Any]:
    """Which scorer a task's metrics come from, with the versions of the packages it uses."""
    from importlib.metadata import PackageNotFoundError, version

    kind = get_kind(spec.kind)
    versions = {}
    for name in kind.scorer_packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"kind": spec.kind, "metrics": list(getattr(spec, "metrics", []) or []), "packages": versions,
            **{k: getattr(spec, k) for k in kind.scorer_settings}}


def provenance(source: dict | None, spec: TaskSpec, shots: Shots) -> dict[str, Any]:
    """Everything a task's numbers depend on: the model (`source`: kosmos.weights.weights_identity, or a
    training run and step), the full protocol (the task's settings, shots, their seed and retrieval), the
    scorer and the project's version."""
    protocol = {**dataclasses.asdict(spec), "stop": list(spec.stop), "shots": shots.k,
                "seed": shots.seed, "retrieval": shots.similar is not None}
    return {"checkpoint": source, "protocol": protocol, "scorer": scorer_info(spec),
            "kosmos": project_version()}


def _check_provenance(folder: Path, prov: dict[str, Any]) -> None:
    """Refuse predictions of another checkpoint or protocol in `folder` (one line naming what differs); the
    project's version may differ (a resumed run after an update continues)."""
    path = folder / PROVENANCE
    if not path.is_file():
        return
    try:
        old = load_json(path.read_text())
    except ValueError as e:
        raise EvalDataError(f"{path}: unreadable ({e}); remove the folder to start its predictions "
                            "over") from None
    diffs = []
    for part in ("checkpoint", "protocol"):
        a, b = (old.get(part) or {}), (prov.get(part) or {})
        if part == "checkpoint":  # what the weights are, not where they lie
            a, b = ({k: d.get(k) for k in ("sha256", "step", "run")} for d in (a, b))
        diffs += [f"{part}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k)]
    if diffs:
        more = "; ..." if len(diffs) > 3 else ""
        raise EvalDataError(f"{folder} holds predictions of another checkpoint or protocol "
                            f"({'; '.join(diffs[:3])}{more}): give another --out, or remove the folder")


def _source_tag(source: dict | None) -> str:
    """A prediction record's short name of its weights: `sha256[:12]@step` (a training run: `run@step`)."""
    if not source:
        return ""
    return f"{(source.get('sha256') or 'run')[:12]}@{source.get('step')}"


def _model_cell(metrics: dict) -> str:
    """`step N, sha256 abcdef12` (a training run's: its step) of a metrics.json's provenance; else `-`."""
    src = (metrics.get("provenance") or {}).get("checkpoint") or {}
    parts = [f"step {src['step']}" if src.get("step") is not None else "",
             f"sha256 {src['sha256'][:8]}" if src.get("sha256") else ""]
    return ", ".join(p for p in parts if p) or "-"


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    metrics: dict[str, float]
    predicted: int
    skipped: dict[str, int]
    folder: Path


def run_task(model, encoder, task: str, spec: TaskSpec, data: TaskData, out: str | Path, shots: Shots,
             dist=None, limit: int | None = None, progress: bool = True,
             source: dict | None = None) -> RunResult:
    """Predict every item not predicted yet, then (main process) write the results and metrics.

    `dist`: anything with process_index, num_processes, is_main_process and wait_for_everyone() (an
    accelerate Accelerator or PartialState); None for one process. `limit`: the first that many items
    (>= 1; None: all). `source`: what the model is (kosmos.weights.weights_identity; training: its run and
    step), recorded with the protocol in `provenance.json` and metrics.json, and by a short tag (`model`) in
    every prediction record; a folder holding predictions of another source or protocol is refused
    (EvalDataError)."""
    from kosmos.progress import bar

    rank = dist.process_index if dist is not None else 0
    world = dist.num_processes if dist is not None else 1
    barrier = dist.wait_for_everyone if dist is not None else (lambda: None)
    main = rank == 0
    folder = Path(out) / task / f"{shots.k}shot"
    folder.mkdir(parents=True, exist_ok=True)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a number of items >= 1 (or None: all), got {limit!r}")
    items = data.items if limit is None else data.items[:limit]
    prov = provenance(source, spec, shots)
    _check_provenance(folder, prov)  # every rank: the same files, the same answer
    tag = _source_tag(source)
    done, _ = read_predictions(folder)
    barrier()  # every process has read what is done before any writes more
    if main and not (folder / PROVENANCE).is_file():
        (folder / PROVENANCE).write_text(json.dumps(prov, indent=1, ensure_ascii=False))
    todo = [it for it in items if it.key not in done]
    B = max(1, spec.batch_size)
    batches = [todo[i:i + B] for i in range(0, len(todo), B)][rank::world]
    predictor = Predictor(model, encoder, spec, data, shots)
    skipped: Counter = Counter()
    path = folder / f"predictions.rank{rank}.jsonl"
    if path.is_file() and path.stat().st_size:  # a line cut by a crash must not swallow the next record
        with open(path, "rb") as f:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    with open(path, "a", encoding="utf-8") as f:
        for batch in bar(batches, desc=f"{task} {shots.k}-shot", unit="batch", enabled=progress and main):
            for rec in predictor(batch):
                if tag:  # every record says which weights it came from (the rest: provenance.json)
                    rec["model"] = tag
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if "skipped" in rec:
                    skipped[rec["skipped"]] += 1
                    if skipped[rec["skipped"]] <= 5:
                        log.warning("skipped %s: %s (%s)", rec["id"], rec["skipped"], rec["path"])
            f.flush()
    barrier()
    wanted = {it.key for it in items}
    done, skips = read_predictions(folder)
    preds = {k: v for k, v in done.items() if k in wanted}
    still = Counter(r for k, r in skips.items() if k not in preds and k in wanted)  # by the last reason
    skipped_all = dict(Counter(data.read_skipped) + still)
    metrics: dict[str, float] = {}
    if main:
        results = official_results(spec, data, preds)
        (folder / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1))
        metrics = score(spec, data, preds)
        summary = {"task": task, "shots": shots.k, "predicted": len(preds), "items": len(items),
                   "skipped": skipped_all, "metrics": metrics, "paper": PAPER.get((task, shots.k), {}),
                   "paper_convention": PAPER_CONVENTIONS.get(task) if (task, shots.k) in PAPER else None,
                   "protocol": spec.__dict__ | {"stop": list(spec.stop)}, "provenance": prov}
        (folder / "metrics.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        (Path(out) / "results.md").write_text(markdown_table(Path(out)))
    barrier()
    return RunResult(metrics, len(preds), skipped_all, folder)


def build_shots(model, encoder, spec: TaskSpec, data: TaskData, k: int, seed: int = 0,
                retrieval: bool = False, batch_size: int = 32) -> Shots:
    """Demonstrations for k-shot runs: random from the support set (seeded), or by image similarity (RICES,
    `kosmos.eval.rices`)."""
    if not k:
        return Shots()
    if not get_kind(spec.kind).few_shot or not spec.demo:
        names = [name for name, kind in KINDS.items() if kind.few_shot]
        kinds = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise ValueError(f"few-shot is for {kinds} tasks, not {spec.kind}")
    support = [s for s in (data.support if data.support is not None else data.items) if s.references]
    need = k + (data.support is None)  # demonstrations from the evaluated items: never the query itself
    if len(support) < need:
        raise ValueError(f"{k}-shot needs at least {need} support items with references, got {len(support)}")
    if retrieval:
        from kosmos.eval.rices import rice_index

        return Shots(k, support, seed, rice_index(model, encoder, support, batch_size))
    return Shots(k, support, seed)

# ----------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected numbers separated by commas, e.g. 0,4,8") from None
    if not values or min(values) < 0:
        raise ValueError(f"--shots {text!r}: expected numbers >= 0, e.g. 0,4,8")
    return values


SETTING_FLAGS: dict[str, tuple[str, ...]] = {"num_beams": ("--beams", "--num-beams")}
"""Option strings of a task setting when `--name-with-dashes` will not do (`--beams`, as kosmos.generate
spells it; `--num-beams` too)."""
NOT_FLAGS = ("kind", "description")
"""TaskSpec fields without a flag of their own (`--set` still takes them)."""
SETTING_HELP = {
    "prompt": "\\n for a newline",
    "separator": "\\n for a newline",
    "stop": "repeat for several; they replace the task's",
    "metrics": "comma-separated, or repeated",
}
"""What a flag adds to its field's docstring."""
CHOICES = {"mode": ("constrained", "unconstrained")}
ESCAPED = ("prompt", "demo", "separator")
"""Settings where "\\n" on a command line means a newline (so are --stop's strings)."""


def add_setting_flags(ap) -> None:
    """One flag per field of TaskSpec (`--max-new-tokens` -> max_new_tokens, ...; default None: the task's
    own), typed by the field's annotation, its help the field's docstring; a list field is repeated
    (`--stop A --stop B`; `--metrics` also takes commas)."""
    from kosmos.docstrings import field_docs

    hints, docs = typing.get_type_hints(TaskSpec), field_docs(TaskSpec)
    for f in dataclasses.fields(TaskSpec):
        if f.name in NOT_FLAGS:
            continue
        names = SETTING_FLAGS.get(f.name, ("--" + f.name.replace("_", "-"),))
        notes = "; ".join(x for x in (SETTING_HELP.get(f.name), "default: the task's") if x)
        help_ = f"{docs.get(f.name, f.name)} ({notes})".replace("%", "%%")
        hint = hints[f.name]
        if typing.get_origin(hint) is list:
            ap.add_argument(*names, dest=f.name, action="append", help=help_)
        else:
            ap.add_argument(*names, dest=f.name, type=hint, choices=CHOICES.get(f.name), help=help_)


def _settings(args) -> dict[str, Any]:
    """The task settings given on the command line (the flags of `add_setting_flags`, --set key=value)."""
    from kosmos.config import parse_overrides

    fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    changes: dict[str, Any] = {name: getattr(args, name) for name in fields
                               if name not in NOT_FLAGS and getattr(args, name) is not None}
    if "metrics" in changes:
        changes["metrics"] = [m.strip() for text in changes["metrics"] for m in text.split(",") if m.strip()]
    if "stop" in changes:
        changes["stop"] = [s.encode().decode("unicode_escape") for s in changes["stop"]]
    for key, value in parse_overrides(args.set):
        if key not in fields:
            raise ValueError(f"--set {key}: unknown task setting; settings: {', '.join(fields)}")
        changes[key] = value
    for name in ESCAPED:
        if name in changes:  # "\n" on a command line means a newline
            changes[name] = str(changes[name]).encode().decode("unicode_escape")
    return changes


def main(argv: list[str] | None = None) -> int:
    import argparse

    from kosmos.eval.tasks import TASKS

    tasks = "\n".join(f"  {name:<22} {spec.description}" for name, spec in TASKS.items())
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.eval", "run"),
                                 description=__doc__ + "\ntasks:\n" + tasks,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run's output dir")
    ap.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK", help="see the list above")
    ap.add_argument("--data", required=True,
                    help="captioning: Karpathy dataset_*.json, a COCO caption file, a folder of images, "
                         "caption shards or a JSONL; vqa: the questions JSON (VizWiz: its one file) or a "
                         "JSONL; classification: a folder per class or a CSV; choice/labels: a JSONL; "
                         "ranked choice (language tasks, rendered_sst2, hatefulmemes, probes): the "
                         "benchmark's file as released (kosmos.eval.datasets.RANKED_FORMATS); websrc: its "
                         "data folder or a dataset.csv")
    ap.add_argument("--annotations", help="vqa: the annotations JSON (answers); without it, predictions "
                                          "only; piqa: its labels file (valid-labels.lst)")
    ap.add_argument("--images", help="image root (default: the folder of --data)")
    ap.add_argument("--split", default="test", help="Karpathy split to evaluate (default test); websrc: "
                                                    "a split of its dataset_split*.json (dev)")
    ap.add_argument("--classnames", help="classification: class names, one per line or a JSON list")
    ap.add_argument("--shots", default="0", help="demonstrations, comma-separated: 0,2,4,8 (default 0)")
    ap.add_argument("--support", help="few-shot support set, same format as --data (default: the "
                                      "Karpathy train split for captioning; else the evaluated items, never "
                                      "the query itself)")
    ap.add_argument("--support-annotations", help="vqa: the support set's annotations; piqa: its labels")
    ap.add_argument("--retrieval", action="store_true",
                    help="few-shot: the most similar support images (RICES) instead of random ones")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random demonstrations")
    ap.add_argument("--limit", type=int, help="evaluate the first N items only (N >= 1)")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    add_setting_flags(ap)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other task setting (kosmos.eval.tasks.TaskSpec), e.g. --set length_penalty=0.5")
    ap.add_argument("--device", default=None, help="default: accelerate's (cuda when there is one)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value for the model")
    args = ap.parse_args(argv)

    from kosmos.eval.datasets import EvalDataError
    from kosmos.eval.tasks import get_task

    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit}: expected a number of items >= 1 (leave it out for all)")
        shots_list = _int_list(args.shots)
        spec = get_task(args.task, **_settings(args))
        data = load_task_data(spec, args.data, args.annotations, args.images, args.split, args.classnames)
        if max(shots_list) > 0:
            data.support = load_support(spec, args.data, args.support, args.support_annotations,
                                        args.images, args.classnames)
    except (ValueError, FileNotFoundError, EvalDataError) as e:
        ap.exit(2, f"error: {e}\n")
    if not data.items:
        ap.exit(2, f"error: --data {args.data}: no items"
                + (f" in split {args.split!r}" if args.split else "") + "\n")

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from kosmos.generate import load_for_inference

    # PartialState, unlike Accelerator, does not read ACCELERATE_USE_CPU: without cpu=True two CPU
    # processes under `accelerate launch` would each run alone as rank 0 of 1.
    cpu = args.device == "cpu" or not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu)
    device = args.device or state.device
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(message)s")
    model, encoder = load_for_inference(args.checkpoint, overrides=args.overrides, device=device)
    from kosmos.weights import find_checkpoint, weights_identity

    source = weights_identity(find_checkpoint(args.checkpoint))
    for k in shots_list:
        try:
            shots = build_shots(model, encoder, spec, data, k, args.seed, args.retrieval)
        except ValueError as e:
            ap.exit(2, f"error: {e}\n")
        res = run_task(model, encoder, args.task, spec, data, args.out, shots, dist=state, limit=args.limit,
                       progress=not args.no_progress, source=source)
        if state.is_main_process:
            skipped = ", ".join(f"{r}={n}" for r, n in res.skipped.items()) or "none"
            print(f"{args.task} {k}-shot: {res.predicted} predicted, skipped: {skipped}; "
                  f"{res.folder / 'results.json'}", flush=True)
            print(json.dumps({"task": args.task, "shots": k, **res.metrics}), flush=True)
    if state.is_main_process:
        print((Path(args.out) / "results.md").read_text(), end="")
    return 0


def load_support(spec: TaskSpec, data: str, support: str | None = None,
                 support_annotations: str | None = None, images: str | None = None,
                 classnames: str | None = None) -> list[Item] | None:
    """The few-shot support set, for the CLI and `train.eval_tasks` alike: `support` (read as `data` is,
    its "train" split), or the kind's support split of `data` (captioning: Karpathy's train split), or None
    (demonstrations come from the evaluated items themselves, never the query)."""
    if support:
        return load_task_data(spec, support, support_annotations, images, "train", classnames).items
    split = get_kind(spec.kind).support_split(data)
    if split is not None:
        try:
            items = load_task_data(spec, data, None, images, split).items
        except Exception:  # noqa: BLE001 - not a file with that split
            items = []
        if items:
            return items
    log.warning("few-shot: no support set; demonstrations come from the evaluated items (never the query)")
    return None
