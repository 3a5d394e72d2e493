"""Run a benchmark task on a model: predictions in the official formats, metrics, a markdown table.

    python -m kosmos.eval run --checkpoint runs/kosmos --task coco_captioning \\
        --data karpathy/dataset_coco.json --images coco/ --shots 0,4 --out results/

Batched, distributed (each process takes every N-th batch of a fixed global batching, so N processes
give exactly the predictions of one), resumable (predictions are appended to
`OUT/TASK/Kshot/predictions.rankR.jsonl` batch by batch; a rerun skips the ids already there), with a
progress bar. An item whose image is missing or unreadable is skipped, counted and named. When the data
has references the predictions are scored (`kosmos.eval.caption_metrics`, `vqa_metrics`,
`label_metrics`); without them (a folder of images, a shard set, a JSONL of prompts) only predictions are
written. Protocols: `kosmos.eval.tasks`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kosmos.data.format import IMAGE_SUFFIXES
from kosmos.eval.tasks import PAPER, PAPER_CONVENTIONS, TaskSpec
from kosmos.untrusted import load_json

log = logging.getLogger(__name__)

@dataclass
class Item:
    """One query of any task, in the runner's terms."""

    id: Any
    images: list[Any]
    """Image paths (or encoded bytes, from shards), in prompt order."""
    fields: dict[str, str] = field(default_factory=dict)
    """Template fields: `question` (vqa), `text` (choice)."""
    references: list[str] = field(default_factory=list)
    """Reference captions, annotator answers or labels ([] when unknown)."""
    label: int | None = None
    """classification: the class index; choice: the right candidate."""
    candidates: list[Any] = field(default_factory=list)
    """choice: strings or {"text", "images"}."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Kept for scoring: answer_type, question_type."""


@dataclass
class TaskData:
    items: list[Item]
    support: list[Item] | None = None
    """Demonstrations for few-shot (items with references)."""
    classnames: list[str] = field(default_factory=list)
    id_key: str = "image_id"
    """The id field of the official results format (VQA: question_id; VizWiz: image)."""
    read_skipped: dict[str, int] = field(default_factory=dict)
    """Samples of the data that could not be read as items, by reason (shards)."""


# ----------------------------------------------------------------------------- reading the data


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _jsonl_items(kind: str, path: Path, root: Path) -> list[Item]:
    """A JSONL of prompts without the benchmark's own format: {"id"?, "image", "question"? (vqa),
    "captions"/"answers"? (references)}; a line that is not UTF-8 or JSON, a field of the wrong type or a
    repeated id is an EvalDataError naming the file, the line and the field (`kosmos.eval.datasets`)."""
    from kosmos.eval import datasets as ds

    items, seen = [], {}
    for n, row in ds._read_jsonl(path):
        where = f"{path}:{n}"
        item_id = ds.item_id(row, len(items), where, seen)
        image = Path(ds._get(row, "image", str, where))
        question = ds._get(row, "question", str, where) if kind == "vqa" else ""
        field = "answers" if kind == "vqa" else ("captions" if "captions" in row else "caption")
        refs = row.get(field)
        refs = [refs] if isinstance(refs, str) else ds._str_list(refs or [], where, field)
        items.append(Item(id=item_id, images=[image if image.is_absolute() else root / image],
                          fields={"question": question}, references=refs))
    return items


def _shard_items(pattern: str) -> tuple[list[Item], Counter]:
    """Caption shards (this project's format; local, URLs or pipe:, see `kosmos.data.remote`): each sample's
    image, its caption as the reference. Samples the training reader would reject are counted by reason, so
    are shards that cannot be read (and named in the log)."""
    from kosmos.data.format import BadSample, ImageSegment, parse_sample
    from kosmos.data.shards import expand_shards, read_shard

    items, skipped = [], Counter()
    failed: dict[str, str] = {}
    for shard in expand_shards([pattern]):
        for _, raw in read_shard(shard, skipped, failed=failed):
            try:
                segments = parse_sample("captions", raw)
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            image = next(s.data for s in segments if isinstance(s, ImageSegment))
            text = " ".join(s for s in segments if isinstance(s, str)).strip()
            items.append(Item(id=raw["__key__"], images=[image], references=[text] if text else []))
    for shard, why in failed.items():
        log.warning("skipped shard %s (%s)", shard, why)
    return items, skipped


def _from_datasets(kind: str, data: str, annotations: str | None, images: str | None, split: str,
                   classnames: str | None) -> TaskData:
    from kosmos.eval import datasets as ds

    root = images or str(Path(data).parent)
    if kind == "captioning":
        return TaskData([Item(id=c.id, images=[c.image], references=c.references)
                         for c in ds.load_captions(data, root, split=split)])
    if kind == "vqa":
        vqa = ds.load_vqa(data, annotations, root)
        vizwiz = bool(vqa) and isinstance(vqa[0].id, str) and annotations is None
        return TaskData([Item(id=q.id, images=[q.image], fields={"question": q.question},
                              references=q.answers,
                              extra={"answer_type": q.answer_type, "question_type": q.question_type,
                                     "answerable": q.answerable})
                         for q in vqa], id_key="image" if vizwiz else "question_id")
    if kind == "classification":
        items, names = ds.load_classification(data, classnames)
        return TaskData([Item(id=c.id, images=[c.image], label=c.label) for c in items], classnames=names,
                        id_key="id")
    if kind == "choice":
        return TaskData([Item(id=c.id, images=c.images, fields={"text": c.text}, candidates=c.candidates,
                              label=c.answer) for c in ds.load_choices(data, images)], id_key="id")
    if kind == "labels":
        return TaskData([Item(id=x.id, images=[x.image], references=x.labels)
                         for x in ds.load_labels(data, images)], id_key="id")
    raise ValueError(f"unknown task kind {kind!r}")


def load_task_data(spec: TaskSpec, data: str, annotations: str | None = None, images: str | None = None,
                   split: str = "test", classnames: str | None = None) -> TaskData:
    """The items of a task from `data`: the benchmark's own files (see `kosmos.eval.datasets`), or for
    captioning and VQA also a folder of images, a JSONL of prompts, or caption shards (predictions only,
    unless they carry references). Two items with the same id are an EvalDataError naming them: predictions
    are kept by id, so one of them would be dropped without a word."""
    return _unique_ids(_load_task_data(spec, data, annotations, images, split, classnames), data)


def _unique_ids(data: TaskData, where: str) -> TaskData:
    from kosmos.eval.datasets import EvalDataError

    seen: dict[str, int] = {}
    for i, item in enumerate(data.items, 1):
        first = seen.setdefault(_key(item.id), i)
        if first != i:
            raise EvalDataError(f"{where}: items {first} and {i} have the same id {item.id!r}; every item "
                                "needs its own id")
    return data


def _load_task_data(spec: TaskSpec, data: str, annotations: str | None, images: str | None, split: str,
                    classnames: str | None) -> TaskData:
    from kosmos.data.remote import is_remote

    path = Path(data)
    kind = spec.kind
    if kind in ("captioning", "vqa") and path.is_dir() and not any(path.glob("*.tar")):
        if kind == "vqa":
            raise ValueError(f"{data}: a folder of images has no questions; give a JSONL of "
                             '{"image", "question"} rows')
        files = _image_files(path)
        if not files:
            raise ValueError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return TaskData([Item(id=str(p.relative_to(path)), images=[p]) for p in files])
    if kind in ("captioning", "vqa") and path.suffix == ".jsonl":
        items = _jsonl_items(kind, path, Path(images) if images else path.parent)
        return TaskData(items, id_key="image_id" if kind == "captioning" else "question_id")
    if kind == "captioning" and (".tar" in data or path.is_dir() or "{" in data or is_remote(data)):
        items, bad = _shard_items(data)
        return TaskData(items, read_skipped=dict(bad))
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    return _from_datasets(kind, data, annotations, images, split, classnames)


# ----------------------------------------------------------------------------- prompts


def fill(template: str, **values: str) -> str:
    """`template` with `{name}` replaced by each value (`{image}` markers stay; braces in values are kept
    literally, and a literal `{image}` in a value cannot become an image marker)."""
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", str(value).replace("{image}", "(image)"))
    return out


def demo_answer(kind: str, item: Item, rng: random.Random) -> str:
    """The answer a support item shows as a demonstration: a random reference caption, or the most
    common annotator answer."""
    if kind == "vqa":
        return Counter(item.references).most_common(1)[0][0]
    return rng.choice(item.references)


@dataclass
class Shots:
    """How demonstrations are picked for few-shot."""

    k: int = 0
    support: list[Item] = field(default_factory=list)
    seed: int = 0
    similar: Callable[[Item, int], list[int]] | None = None
    """RICES: the indices into `support` of the k most similar items to a query (None: random)."""

    def pick(self, item: Item) -> list[Item]:
        if not self.k:
            return []
        if self.similar is not None:
            chosen = [i for i in self.similar(item, self.k + 1) if self.support[i].id != item.id][: self.k]
        else:  # seeded by the item: the same demonstrations whatever the batch or process count
            pool = [i for i, s in enumerate(self.support) if s.id != item.id]
            chosen = random.Random(f"{self.seed}:{self.k}:{item.id}").sample(pool, min(self.k, len(pool)))
        return [self.support[i] for i in chosen]


def query_text(spec: TaskSpec, item: Item, demos: list[Item], seed: int = 0) -> tuple[str, list[Any]]:
    """(prompt text with `{image}` markers, the images in order) for an item and its demonstrations."""
    parts, images = [], []
    for d in demos:
        rng = random.Random(f"{seed}:demo:{d.id}")
        parts.append(fill(spec.demo, answer=demo_answer(spec.kind, d, rng), **d.fields))
        images.extend(d.images)
    parts.append(fill(spec.prompt, **item.fields))
    images.extend(item.images)
    return spec.separator.join(parts), images


# ----------------------------------------------------------------------------- predicting


class ImageLoader:
    """uint8 images at the model's size; a missing or unusable one raises `Skip(reason, path)`: its reason is
    `kosmos.untrusted.ImageError`'s (``missing_image``, ``decompression_bomb``, ``truncated_image``, ...;
    ``bad_image`` for the rest), so an image PIL refuses is skipped and named, never the end of the run."""

    SAME = ("missing_image", "decompression_bomb", "truncated_image")
    """Reasons kept as they are; other failures count as ``bad_image``."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, image: Any) -> torch.Tensor:
        from kosmos.untrusted import ImageError, image_errors, open_image

        shard = isinstance(image, (bytes, bytearray))
        where = "(shard bytes)" if shard else str(image)
        try:
            if shard:
                with open_image(image) as im, image_errors():
                    return self.encoder.image(im)
            return self.encoder.load_image(Path(image))
        except ImageError as e:
            reason = "missing_image" if e.reason == "not_a_file" else (
                e.reason if e.reason in self.SAME else "bad_image")
            raise Skip(reason, f"{where} {e.detail}" if shard else where) from None


class Skip(Exception):
    def __init__(self, reason: str, path: str):
        super().__init__(f"{reason}: {path}")
        self.reason, self.path = reason, path


def _prompt(encoder, text: str, images: list[torch.Tensor]):
    from kosmos.generate import build_prompt

    return build_prompt(encoder, text, images)


def _choice_prompts(spec: TaskSpec, item: Item, load: ImageLoader, encoder) -> list:
    prompts = []
    for cand in item.candidates:
        text, cand_images = ((cand, []) if isinstance(cand, str)
                             else (cand.get("text", ""), cand.get("images", [])))
        body = fill(spec.prompt, text=item.fields.get("text", ""),
                    candidate=text).replace("<image>", "{image}")
        prompts.append(_prompt(encoder, body, [load(p) for p in [*item.images, *cand_images]]))
    return prompts


def _split_labels(text: str, k: int) -> list[str]:
    seen: list[str] = []
    for part in re.split(r",|;|\band\b|\n", text):
        label = part.strip().strip(".").strip()
        if label and label.lower() not in (s.lower() for s in seen):
            seen.append(label)
    return seen[:k]


class Predictor:
    """Predictions for batches of items of one task (the model is used as it is: eval mode, its device)."""

    def __init__(self, model, encoder, spec: TaskSpec, data: TaskData, shots: Shots):
        from kosmos.generate import GenerationConfig

        self.model, self.encoder, self.spec, self.data, self.shots = model, encoder, spec, data, shots
        self.generates = spec.kind in ("captioning", "vqa", "labels") or (
            spec.kind == "classification" and spec.mode == "unconstrained")
        """Whether predictions are generated (`kosmos.generate`, capped at the model's context)."""
        self.load = ImageLoader(encoder)
        tok = encoder.tokenizer
        self.gen = GenerationConfig.for_tokenizer(tok, num_beams=spec.num_beams,
                                                  max_new_tokens=spec.max_new_tokens,
                                                  length_penalty=spec.length_penalty, stop=list(spec.stop))
        if spec.kind == "classification" and spec.mode == "constrained":
            from kosmos.eval.ranking import class_continuations

            # class_continuations takes the prompt's text after its last {image}
            self.class_ids = class_continuations(tok, spec.prompt, data.classnames)
        if spec.kind == "choice":
            from kosmos.eval.ranking import class_continuations

            self.answer_id = class_continuations(tok, spec.prompt.split("{candidate}")[-1],
                                                 [spec.answer])[0][0]

    def __call__(self, items: list[Item]) -> list[dict]:
        """One record per item: {"id", "prediction", ...} or {"id", "skipped": reason, "path"}."""
        records: list[dict | None] = [None] * len(items)
        prompts, where = [], []
        max_len = self.model.cfg.decoder.max_len
        for i, item in enumerate(items):
            try:
                if self.spec.kind == "choice":
                    prompts.append(_choice_prompts(self.spec, item, self.load, self.encoder))
                else:
                    text, images = query_text(self.spec, item, self.shots.pick(item), self.shots.seed)
                    prompt = _prompt(self.encoder, text, [self.load(x) for x in images])
                    if self.generates and len(prompt.ids) >= max_len:  # no room left to generate
                        raise Skip("prompt_too_long", f"{len(prompt.ids)} tokens, decoder.max_len {max_len}")
                    prompts.append(prompt)
                where.append(i)
            except Skip as s:
                records[i] = {"id": item.id, "skipped": s.reason, "path": s.path}
        if prompts:
            for i, rec in zip(where, self._predict([items[i] for i in where], prompts), strict=True):
                records[i] = rec
        return records  # type: ignore[return-value]

    def _generate(self, prompts: list) -> list[str]:
        from kosmos.generate import cut_at_stop, generate

        outs = generate(self.model, prompts, self.gen)
        return [cut_at_stop(self.encoder.tokenizer.decode(ids), self.spec.stop).strip() for ids in outs]

    def _predict(self, items: list[Item], prompts: list) -> list[dict]:
        kind, spec = self.spec.kind, self.spec
        if kind == "captioning":
            return [{"id": it.id, "prediction": text}
                    for it, text in zip(items, self._generate(prompts), strict=True)]
        if kind == "vqa":
            from kosmos.eval.vqa_metrics import postprocess_answer

            return [{"id": it.id, "prediction": postprocess_answer(text), "raw": text}
                    for it, text in zip(items, self._generate(prompts), strict=True)]
        if kind == "labels":
            return [{"id": it.id, "prediction": _split_labels(text, spec.top_k), "raw": text}
                    for it, text in zip(items, self._generate(prompts), strict=True)]
        if kind == "classification" and spec.mode == "unconstrained":
            names = [n.lower() for n in self.data.classnames]
            out = []
            for it, text in zip(items, self._generate(prompts), strict=True):
                norm = text.lower().strip().strip(".").strip()
                out.append({"id": it.id, "prediction": names.index(norm) if norm in names else -1,
                            "raw": text})
            return out
        if kind == "classification":
            from kosmos.eval.ranking import continuation_logprobs

            scores = continuation_logprobs(self.model, prompts, [self.class_ids] * len(prompts))
            out = []
            for it, row in zip(items, scores, strict=True):
                mean = torch.tensor([s / max(n, 1) for s, n in row])
                top = mean.topk(min(spec.top_k, len(mean))).indices.tolist()
                out.append({"id": it.id, "prediction": top[0], "top": top})
            return out
        if kind == "choice":
            from kosmos.eval.ranking import next_token_logprobs

            out = []
            for it, cand_prompts in zip(items, prompts, strict=True):
                yes = next_token_logprobs(self.model, cand_prompts, [self.answer_id])[:, 0]
                out.append({"id": it.id, "prediction": int(yes.argmax()), "scores": yes.tolist()})
            return out
        raise ValueError(f"unknown task kind {kind!r}")


# ----------------------------------------------------------------------------- files


def _key(x: Any) -> str:
    return json.dumps(x)


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
                    done[_key(rec["id"])] = rec
                if "skipped" in rec:
                    skips[_key(rec["id"])] = rec["skipped"]
    return done, skips


def official_results(spec: TaskSpec, data: TaskData, preds: dict[str, dict]) -> list[dict]:
    """The predictions in the benchmark's results format: COCO `[{"image_id", "caption"}]`, VQA
    `[{"question_id", "answer"}]` (VizWiz `{"image", "answer"}`), else `[{"id", "prediction"}]`."""
    out = []
    for item in data.items:
        rec = preds.get(_key(item.id))
        if rec is None:
            continue
        if spec.kind == "captioning":
            out.append({data.id_key: item.id, "caption": rec["prediction"]})
        elif spec.kind == "vqa":
            out.append({data.id_key: item.id, "answer": rec["prediction"]})
        elif spec.kind == "classification":
            pred = rec["prediction"]
            out.append({"id": item.id,
                        "prediction": data.classnames[pred] if pred >= 0 else rec.get("raw", ""),
                        "top": [data.classnames[i] for i in rec.get("top", [])]})
        else:
            out.append({"id": item.id, "prediction": rec["prediction"]})
    return out


def score(spec: TaskSpec, data: TaskData, preds: dict[str, dict]) -> dict[str, float]:
    """The task's metrics over the predicted items that have references ({} when none has)."""
    scored = [it for it in data.items if _key(it.id) in preds
              and (it.references or (it.label is not None and spec.kind in ("classification", "choice")))]
    if not scored:
        return {}
    p = {_key(it.id): preds[_key(it.id)]["prediction"] for it in scored}
    if spec.kind == "captioning":
        from kosmos.eval.caption_metrics import score_captions

        chosen = [m for m in spec.metrics if m != "SPICE"]
        return score_captions({_key(it.id): it.references for it in scored}, p, spice="SPICE" in spec.metrics,
                              **({"metrics": chosen} if chosen else {}))
    if spec.kind == "vqa":
        from kosmos.eval.vqa_metrics import score_vqa

        return score_vqa({_key(it.id): it.references for it in scored}, p,
                         answer_types={_key(it.id): it.extra.get("answer_type") for it in scored},
                         question_types={_key(it.id): it.extra.get("question_type") for it in scored},
                         rules=spec.vqa_rules,
                         answerable={_key(it.id): it.extra.get("answerable") for it in scored})
    if spec.kind == "labels":
        from kosmos.eval.label_metrics import score_labels

        return score_labels(p, {_key(it.id): it.references for it in scored})
    if spec.kind == "classification":
        top1 = sum(p[_key(it.id)] == it.label for it in scored)
        out = {"top1": round(100 * top1 / len(scored), 2), "n": len(scored)}
        if spec.mode == "constrained":
            topk = sum(it.label in preds[_key(it.id)]["top"] for it in scored)
            out[f"top{spec.top_k}"] = round(100 * topk / len(scored), 2)
        return out
    correct = sum(p[_key(it.id)] == it.label for it in scored)  # choice
    return {"accuracy": round(100 * correct / len(scored), 2), "n": len(scored)}


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
        rows.append(f"| {m['task']} | {m['shots']} | {m['predicted']} | {skipped} | {cells} | {ref} |")
    head = "| task | shots | predicted | skipped | metrics | KOSMOS-1 paper |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    metrics: dict[str, float]
    predicted: int
    skipped: dict[str, int]
    folder: Path


def run_task(model, encoder, task: str, spec: TaskSpec, data: TaskData, out: str | Path, shots: Shots,
             dist=None, limit: int | None = None, progress: bool = True) -> RunResult:
    """Predict every item not predicted yet, then (main process) write the results and metrics.

    `dist`: anything with process_index, num_processes, is_main_process and wait_for_everyone() (an
    accelerate Accelerator or PartialState); None for one process. `limit`: the first that many items
    (>= 1; None: all)."""
    from tqdm.auto import tqdm

    rank = dist.process_index if dist is not None else 0
    world = dist.num_processes if dist is not None else 1
    barrier = dist.wait_for_everyone if dist is not None else (lambda: None)
    main = rank == 0
    folder = Path(out) / task / f"{shots.k}shot"
    folder.mkdir(parents=True, exist_ok=True)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a number of items >= 1 (or None: all), got {limit!r}")
    items = data.items if limit is None else data.items[:limit]
    done, _ = read_predictions(folder)
    barrier()  # every process has read what is done before any writes more
    todo = [it for it in items if _key(it.id) not in done]
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
        for batch in tqdm(batches, desc=f"{task} {shots.k}-shot", unit="batch",
                          disable=not (progress and main),
                          dynamic_ncols=True):
            for rec in predictor(batch):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if "skipped" in rec:
                    skipped[rec["skipped"]] += 1
                    if skipped[rec["skipped"]] <= 5:
                        log.warning("skipped %s: %s (%s)", rec["id"], rec["skipped"], rec["path"])
            f.flush()
    barrier()
    wanted = {_key(it.id) for it in items}
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
                   "protocol": spec.__dict__ | {"stop": list(spec.stop)}}
        (folder / "metrics.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        (Path(out) / "results.md").write_text(markdown_table(Path(out)))
    barrier()
    return RunResult(metrics, len(preds), skipped_all, folder)


def build_shots(model, encoder, spec: TaskSpec, data: TaskData, k: int, seed: int = 0,
                retrieval: bool = False, batch_size: int = 32) -> Shots:
    """Demonstrations for k-shot runs: random from the support set (seeded), or by image similarity."""
    if not k:
        return Shots()
    if spec.kind not in ("captioning", "vqa") or not spec.demo:
        raise ValueError(f"few-shot is for captioning and VQA tasks, not {spec.kind}")
    support = [s for s in (data.support if data.support is not None else data.items) if s.references]
    need = k + (data.support is None)  # demonstrations from the evaluated items: never the query itself
    if len(support) < need:
        raise ValueError(f"{k}-shot needs at least {need} support items with references, got {len(support)}")
    similar = rice_index(model, encoder, support, batch_size) if retrieval else None
    return Shots(k, support, seed, similar)


def rice_index(model, encoder, support: list[Item], batch_size: int = 32) -> Callable[[Item, int], list[int]]:
    """RICES: a function (query, n) -> the indices of the n support items whose images are most similar
    (cosine of mean-pooled features of the model's vision tower). Unreadable support images never match."""
    load = ImageLoader(encoder)
    device = next(model.parameters()).device

    @torch.no_grad()
    def features(images: list) -> torch.Tensor:
        feats = model.vision(torch.stack(images).to(device)).float().mean(1)
        return torch.nn.functional.normalize(feats, dim=-1)

    rows, ok = [], []
    for i in range(0, len(support), batch_size):
        imgs = []
        for j, s in enumerate(support[i:i + batch_size]):
            try:
                imgs.append(load(s.images[0]))
                ok.append(i + j)
            except Skip:
                pass
        if imgs:
            rows.append(features(imgs))
    bank = torch.cat(rows) if rows else torch.zeros(0, 1, device=device)
    index = torch.tensor(ok, dtype=torch.long)

    def similar(item: Item, n: int) -> list[int]:
        q = features([load(item.images[0])])  # a missing query image was already skipped
        order = (bank @ q[0]).argsort(descending=True)[:n].cpu()
        return index[order].tolist()

    return similar


# ----------------------------------------------------------------------------- during training

_TRAIN_DATA: dict[str, TaskData] = {}


def evaluate_tasks(acc, tasks: list[dict], model, encoder, out: str | Path) -> dict[str, float]:
    """The `train.eval_tasks` of a run on the model being trained (all ranks take part): numeric metrics as
    `eval/TASK/METRIC` (`eval/TASK_Kshot/METRIC` for few-shot). Each task's data is read once per process;
    `limit` defaults to 200 items. Bad data was refused when the config was checked only for its keys: a
    task whose files fail here is logged and left out, never the end of the training run."""
    from kosmos.config import EVAL_TASK_OPTIONS
    from kosmos.eval.datasets import EvalDataError
    from kosmos.eval.tasks import get_task

    results: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for entry in tasks:
            opts = {k: v for k, v in entry.items() if k in EVAL_TASK_OPTIONS}
            key = json.dumps(entry, sort_keys=True)
            try:
                settings = {k: v for k, v in entry.items() if k not in EVAL_TASK_OPTIONS}
                spec = get_task(entry["task"], **settings)
                if key not in _TRAIN_DATA:
                    data = load_task_data(spec, opts["data"], opts.get("annotations"), opts.get("images"),
                                          opts.get("split", "test"), opts.get("classnames"))
                    if opts.get("shots", 0) and opts.get("support"):
                        data.support = load_task_data(spec, opts["support"], opts.get("support_annotations"),
                                                      opts.get("images"), "train").items
                    _TRAIN_DATA[key] = data
                data = _TRAIN_DATA[key]
                shots = build_shots(model, encoder, spec, data, opts.get("shots", 0), opts.get("seed", 0),
                                    bool(opts.get("retrieval")))
            except (ValueError, FileNotFoundError, EvalDataError) as e:
                log.warning("train.eval_tasks %s: %s (left out)", entry["task"], e)
                continue
            res = run_task(model, encoder, entry["task"], spec, data, out, shots, dist=acc,
                           limit=opts.get("limit", 200), progress=False)
            name = entry["task"] + (f"_{shots.k}shot" if shots.k else "")
            for metric, value in res.metrics.items():
                if isinstance(value, (int, float)) and metric != "n":
                    results[f"eval/{name}/{metric}"] = float(value)
    finally:
        model.train(was_training)
    return results


# ----------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected numbers separated by commas, e.g. 0,4,8") from None
    if not values or min(values) < 0:
        raise ValueError(f"--shots {text!r}: expected numbers >= 0, e.g. 0,4,8")
    return values


def _settings(args) -> dict[str, Any]:
    """The task settings given on the command line (--prompt, --num-beams, ..., --set key=value)."""
    import dataclasses

    from kosmos.config import parse_overrides

    changes: dict[str, Any] = {}
    for name in ("prompt", "demo", "separator", "num_beams", "max_new_tokens", "mode", "batch_size"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.metrics is not None:
        changes["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.stop is not None:
        changes["stop"] = [s.encode().decode("unicode_escape") for s in args.stop]
    fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    for key, value in parse_overrides(args.set):
        if key not in fields:
            raise ValueError(f"--set {key}: unknown task setting; settings: {', '.join(fields)}")
        changes[key] = value
    for name in ("prompt", "demo", "separator"):
        if name in changes:  # "\n" on a command line means a newline
            changes[name] = str(changes[name]).encode().decode("unicode_escape")
    return changes


def main(argv: list[str] | None = None) -> int:
    import argparse

    from kosmos.eval.tasks import TASKS

    tasks = "\n".join(f"  {name:<22} {spec.description}" for name, spec in TASKS.items())
    ap = argparse.ArgumentParser(prog="python -m kosmos.eval run", description=__doc__ + "\ntasks:\n" + tasks,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run's output dir")
    ap.add_argument("--task", required=True, choices=list(TASKS), metavar="TASK", help="see the list above")
    ap.add_argument("--data", required=True,
                    help="captioning: Karpathy dataset_*.json, a COCO caption file, a folder of images, "
                         "caption shards or a JSONL; vqa: the questions JSON (VizWiz: its one file) or a "
                         "JSONL; classification: a folder per class or a CSV; choice/labels: a JSONL")
    ap.add_argument("--annotations", help="vqa: the annotations JSON (answers); without it, predictions only")
    ap.add_argument("--images", help="image root (default: the folder of --data)")
    ap.add_argument("--split", default="test", help="Karpathy split to evaluate (default test)")
    ap.add_argument("--classnames", help="classification: class names, one per line or a JSON list")
    ap.add_argument("--shots", default="0", help="demonstrations, comma-separated: 0,2,4,8 (default 0)")
    ap.add_argument("--support", help="few-shot support set, same format as --data (default: the "
                                      "Karpathy train split for captioning; else the evaluated items, never "
                                      "the query itself)")
    ap.add_argument("--support-annotations", help="vqa: the support set's annotations")
    ap.add_argument("--retrieval", action="store_true",
                    help="few-shot: the most similar support images (RICES) instead of random ones")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random demonstrations")
    ap.add_argument("--limit", type=int, help="evaluate the first N items only (N >= 1)")
    ap.add_argument("--out", default="results", help="output folder (default results/)")
    ap.add_argument("--prompt", help="the query template ({image}, {question}, {text}, {candidate})")
    ap.add_argument("--demo", help="one demonstration's template ({answer} too)")
    ap.add_argument("--separator", help="between demonstrations (\\n for a newline)")
    ap.add_argument("--num-beams", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--stop", action="append", help="a stop string; repeat for several (replaces the task's)")
    ap.add_argument("--mode", choices=["constrained", "unconstrained"], help="classification mode")
    ap.add_argument("--batch-size", type=int, help="queries per batch per process")
    ap.add_argument("--metrics", help="captioning: comma-separated subset of BLEU,METEOR,ROUGE-L,CIDEr,SPICE "
                                      "(default all but SPICE)")
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
            data.support = _support(spec, args)
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
    for k in shots_list:
        try:
            shots = build_shots(model, encoder, spec, data, k, args.seed, args.retrieval)
        except ValueError as e:
            ap.exit(2, f"error: {e}\n")
        res = run_task(model, encoder, args.task, spec, data, args.out, shots, dist=state, limit=args.limit,
                       progress=not args.no_progress)
        if state.is_main_process:
            skipped = ", ".join(f"{r}={n}" for r, n in res.skipped.items()) or "none"
            print(f"{args.task} {k}-shot: {res.predicted} predicted, skipped: {skipped}; "
                  f"{res.folder / 'results.json'}", flush=True)
            print(json.dumps({"task": args.task, "shots": k, **res.metrics}), flush=True)
    if state.is_main_process:
        print((Path(args.out) / "results.md").read_text(), end="")
    return 0


def _support(spec: TaskSpec, args) -> list[Item] | None:
    """The few-shot support set: --support, or the Karpathy file's train split, or None (the evaluated
    items themselves)."""
    if args.support:
        return load_task_data(spec, args.support, args.support_annotations, args.images, "train",
                              args.classnames).items
    if spec.kind == "captioning" and Path(args.data).suffix == ".json":
        try:
            items = load_task_data(spec, args.data, None, args.images, "train").items
        except Exception:  # noqa: BLE001 - not a Karpathy file with a train split
            items = []
        if items:
            return items
    log.warning("few-shot: no --support set; demonstrations come from the evaluated items (never the query)")
    return None
