"""Readers of the benchmark files: items with image paths, references and answers, nothing loaded.

    captions        Karpathy `dataset_coco.json` / `dataset_flickr30k.json` (a split), or a COCO caption
                    file {"images": [{id, file_name}], "annotations": [{image_id, caption}]}
    vqa             VQAv2 / OK-VQA question + annotation JSON; VizWiz's single file (a list of
                    {image, question, answers: [{answer, answer_confidence}], answer_type})
    classification  an ImageNet-style folder (one subfolder per class), or a CSV `image,label` plus class
                    names
    choices         JSONL {"id", "images", "text" with <image> placeholders, "candidates", "answer"}
    labels          JSONL {"id", "image", "labels"} (open-vocabulary labels, NxTP)
    ranked          the language benchmarks as released (StoryCloze CSV, HellaSwag, WSC273, Winogrande,
                    PIQA, SuperGLUE's BoolQ/CB/COPA JSONL), Hateful Memes' JSONL, a class folder (Rendered
                    SST-2): `load_ranked`, `RANKED_FORMATS`; texts as lm-evaluation-harness builds them
    prompts         JSONL {"id"?, "image", "question"?, "captions"/"answers"?} (captioning and VQA without
                    the benchmark's own files), a folder of images, or caption shards (predictions only,
                    unless they carry references)

Each task kind (`kosmos.eval.kinds`) turns what these readers give into the runner's `Item`s (`TaskData`).
Malformed input raises `EvalDataError`, one line naming the file and the field. A missing image file is not
an error here: items carry the path, the runner counts and skips the missing ones. Relative image paths
in JSONL/CSV resolve against `image_root`, by default the file's folder.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos.data.format import IMAGE_SUFFIXES
from kosmos.errors import KosmosError
from kosmos.untrusted import load_json

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"


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

    @property
    def key(self) -> str:
        """The id as predictions, resumes and scores keep it (`id_text`)."""
        return id_text(self.id)


def id_text(item_id: Any) -> str:
    """An item id as predictions, resumes and scores keep it: its JSON text (1 and "1" are two ids)."""
    return json.dumps(item_id)


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


class EvalDataError(KosmosError, ValueError):
    """A malformed benchmark file; the message names the file and the field."""


def check_references(predictions: dict, references: dict, ids: str, refs: str) -> None:
    """What every scorer checks first: predictions there are, and each predicted id has (non-empty)
    references; else a ValueError saying how many lack them and naming the first five
    (``"2 of 3 predicted {ids} have no {refs}: 1, 'x'"``)."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [i for i in predictions if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(predictions)} predicted {ids} have no {refs}: "
                         f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}")


@dataclass
class CaptionItem:
    id: int | str
    """COCO image id (Karpathy COCO: "cocoid"); Flickr30k: the file name's stem, int when numeric."""
    image: str
    """Image path, resolved against the image root."""
    references: list[str]
    """Raw reference captions ([] when the file has none)."""


@dataclass
class VQAItem:
    id: int | str
    """question_id (VizWiz: the image file name, as its results format uses)."""
    image: str
    question: str
    answers: list[str]
    """The (10) annotator answers, [] without annotations."""
    answer_type: str | None = None
    question_type: str | None = None
    answerable: int | None = None
    """VizWiz's `answerable` (1, or 0 for a question its annotators could not answer); None elsewhere."""


@dataclass
class ClassItem:
    id: str
    """Path relative to the root folder, or the CSV's id column (its row number without one)."""
    image: str
    label: int
    """Index into the class names."""


@dataclass
class ChoiceItem:
    id: str
    images: list[str]
    text: str
    """The prompt; one <image> placeholder per entry of `images`, in order."""
    candidates: list
    """Each a string, or a dict {"text", "images"} (Raven: a candidate is an image); a dict's text has one
    <image> per image ("<image>" * len(images) when it gives no text)."""
    answer: int | None
    """Index of the right candidate, None when unknown."""


@dataclass
class LabelItem:
    id: str
    image: str
    labels: list[str]
    """Reference labels, [] when the file has none."""


# ----------------------------------------------------------------------------- helpers


def _fail(path, field: str, problem: str):
    raise EvalDataError(f"{path}: {field}: {problem}")


def read_json(path):
    """A JSON file, or an EvalDataError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return load_json(f.read())
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; an EvalDataError naming the file and the line for one
    that is not UTF-8, not JSON or not an object. The one JSONL reader of the benchmark files (prompts,
    choices, labels)."""
    path = Path(path)
    rows = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise EvalDataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                        f"column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = load_json(line)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(obj, dict):
                    _fail(f"{path}:{n}", "line", f"expected a JSON object, got {type(obj).__name__}")
                rows.append((n, obj))
    except (FileNotFoundError, IsADirectoryError):
        raise EvalDataError(f"{path}: no such file") from None
    return rows


def item_id(obj: dict, default: int, where, seen: dict[str, str] | None = None) -> int | str:
    """A JSONL item's "id" (a string or a whole number; default the line number), refused when another item
    of the file already has it (`seen`: id -> where): predictions, resumes and results are kept by id, so
    a repeated one would silently drop an item."""
    value = obj.get("id", default)
    if isinstance(value, bool) or not isinstance(value, int | str):
        _fail(where, "id", f"expected a string or a whole number, got {type(value).__name__} {value!r:.40}")
    if seen is not None:
        key = str(value)
        if key in seen:
            _fail(where, "id", f"{value!r} is already the id of {seen[key]}; every item needs its own id")
        seen[key] = str(where)
    return value


def _get(obj: dict, key: str, kind, where, field: str | None = None):
    """obj[key] checked to be of `kind`; `field` names it in the error (default: the key)."""
    if not isinstance(obj, dict):
        _fail(where, field or key, f"expected an object holding {key!r}, got {type(obj).__name__}")
    if key not in obj:
        _fail(where, field or key, "missing")
    value = obj[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        _fail(where, field or key, f"expected {names}, got {type(value).__name__} {value!r:.40}")
    return value


def _resolve(root: Path, p: str) -> str:
    return str(root / p)  # an absolute p stays as it is


def _id_from_stem(name: str) -> int | str:
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else stem


def _str_list(value, where, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, field, f"expected a list of strings, got {value!r:.60}")
    return list(value)


# ----------------------------------------------------------------------------- captions


def load_captions(path, image_root, split: str | None = "test") -> list[CaptionItem]:
    """Captioning items from Karpathy's `dataset_coco.json` / `dataset_flickr30k.json` (the images of
    `split`; None: all) or from a COCO-format caption file (every image; `split` does not apply).
    Karpathy COCO paths are image_root/filepath/filename, or image_root/filename when that file exists
    and the first does not (a flat folder of the split's images)."""
    data = read_json(path)
    root = Path(image_root)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        _fail(path, "images", "expected Karpathy's dataset_*.json or a COCO caption file "
                              "(an object with an 'images' list)")
    if "annotations" in data:
        return _coco_captions(data, path, root)
    if all(isinstance(im, dict) and "sentences" in im for im in data["images"]):
        return _karpathy_captions(data, path, root, split)
    _fail(path, "images", "neither a Karpathy file (images with 'sentences') nor a COCO caption file "
                          "(an 'annotations' list)")


def _karpathy_captions(data: dict, path, root: Path, split: str | None) -> list[CaptionItem]:
    items = []
    for i, im in enumerate(data["images"]):
        if split is not None and _get(im, "split", str, path, f"images[{i}].split") != split:
            continue
        filename = _get(im, "filename", str, path, f"images[{i}].filename")
        if "cocoid" in im:
            item_id = _get(im, "cocoid", int, path, f"images[{i}].cocoid")
        else:
            item_id = _id_from_stem(filename)
        image = root / filename
        if "filepath" in im:
            nested = root / _get(im, "filepath", str, path, f"images[{i}].filepath") / filename
            image = image if image.exists() and not nested.exists() else nested
        sentences = _get(im, "sentences", list, path, f"images[{i}].sentences")
        refs = [_get(s, "raw", str, path, f"images[{i}].sentences[{j}].raw") for j, s in enumerate(sentences)]
        items.append(CaptionItem(item_id, str(image), refs))
    if not items and data["images"]:
        _fail(path, "split", f"no image of split {split!r}")
    return items


def _coco_captions(data: dict, path, root: Path) -> list[CaptionItem]:
    anns = data["annotations"]
    if not isinstance(anns, list):
        _fail(path, "annotations", f"expected a list, got {type(anns).__name__}")
    items: dict = {}
    for i, im in enumerate(data["images"]):
        item_id = _get(im, "id", (int, str), path, f"images[{i}].id")
        if item_id in items:
            _fail(path, f"images[{i}].id", f"duplicate image id {item_id!r}")
        name = _get(im, "file_name", str, path, f"images[{i}].file_name")
        items[item_id] = CaptionItem(item_id, _resolve(root, name), [])
    for i, a in enumerate(anns):
        item_id = _get(a, "image_id", (int, str), path, f"annotations[{i}].image_id")
        caption = _get(a, "caption", str, path, f"annotations[{i}].caption")
        if item_id not in items:
            _fail(path, f"annotations[{i}].image_id", f"{item_id!r} is not in 'images'")
        items[item_id].references.append(caption)
    return list(items.values())


# ----------------------------------------------------------------------------- VQA


def load_vqa(questions, annotations, image_root, image_pattern: str | None = None) -> list[VQAItem]:
    """VQA items from the official VQAv2 / OK-VQA question JSON plus (optionally) its annotation JSON,
    or VizWiz's single file (`questions` a list of {image, question, answers, answer_type}; no
    `annotations`). Image files: image_root/COCO_{subtype}_{image_id:012d}.jpg with the questions'
    data_subtype, unless `image_pattern` (a format string with {image_id} and {subtype})."""
    data = read_json(questions)
    root = Path(image_root)
    if isinstance(data, list):
        if annotations is not None:
            _fail(annotations, "annotations", "VizWiz's format is one file: pass no annotations")
        return _vizwiz(data, questions, root)
    if not isinstance(data, dict):
        _fail(questions, "questions", f"expected an object or VizWiz's list, got {type(data).__name__}")
    qs = _get(data, "questions", list, questions)
    subtype = data.get("data_subtype", "")
    pattern = image_pattern or "COCO_{subtype}_{image_id:012d}.jpg"
    if image_pattern is None and (not isinstance(subtype, str) or not subtype):
        _fail(questions, "data_subtype", "missing (it names the image files); give an image pattern instead")
    by_qid: dict = {}
    if annotations is not None:
        ann_data = read_json(annotations)
        anns = _get(ann_data, "annotations", list, annotations)
        for i, a in enumerate(anns):
            qid = _get(a, "question_id", (int, str), annotations, f"annotations[{i}].question_id")
            answers = _get(a, "answers", list, annotations, f"annotations[{i}].answers")
            by_qid[qid] = (
                [_get(x, "answer", str, annotations, f"annotations[{i}].answers[{j}].answer")
                 for j, x in enumerate(answers)],
                _optional_str(a, "answer_type", annotations, f"annotations[{i}].answer_type"),
                _optional_str(a, "question_type", annotations, f"annotations[{i}].question_type"),
            )
    items = []
    for i, q in enumerate(qs):
        qid = _get(q, "question_id", (int, str), questions, f"questions[{i}].question_id")
        image_id = _get(q, "image_id", (int, str), questions, f"questions[{i}].image_id")
        question = _get(q, "question", str, questions, f"questions[{i}].question")
        try:
            name = pattern.format(image_id=image_id, subtype=subtype)
        except (KeyError, ValueError, IndexError) as e:
            raise EvalDataError(f"image pattern {pattern!r}: cannot name image {image_id!r} ({e})") from None
        answers, answer_type, question_type = [], None, None
        if annotations is not None:
            if qid not in by_qid:
                _fail(annotations, "annotations", f"no annotation for question_id {qid!r} of {questions}")
            answers, answer_type, question_type = by_qid[qid]
        items.append(VQAItem(qid, _resolve(root, name), question, answers, answer_type, question_type))
    return items


def _optional_str(obj: dict, key: str, path, field: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        _fail(path, field, f"expected a string, got {type(value).__name__}")
    return value


def _vizwiz(data: list, path, root: Path) -> list[VQAItem]:
    items = []
    for i, q in enumerate(data):
        image = _get(q, "image", str, path, f"[{i}].image")
        question = _get(q, "question", str, path, f"[{i}].question")
        answers = q.get("answers") or []
        if not isinstance(answers, list):
            _fail(path, f"[{i}].answers", f"expected a list, got {type(answers).__name__}")
        answers = [_get(x, "answer", str, path, f"[{i}].answers[{j}].answer") for j, x in enumerate(answers)]
        answerable = q.get("answerable")
        if answerable is not None and answerable not in (0, 1):
            _fail(path, f"[{i}].answerable", f"expected 0 or 1, got {answerable!r:.40}")
        items.append(VQAItem(image, _resolve(root, image), question, answers,
                             _optional_str(q, "answer_type", path, f"[{i}].answer_type"),
                             answerable=None if answerable is None else int(answerable)))
    return items


# ----------------------------------------------------------------------------- classification


def load_classification(path, classnames=None, image_root=None) -> tuple[list[ClassItem], list[str]]:
    """(items, class names) from an ImageNet-style folder (one subfolder per class, sorted; names from the
    folder names with _ as space, or from `classnames`, one per subfolder) or a CSV with columns image,label
    (and optionally id; label an index or a class name) plus `classnames` (required). `classnames` is a
    list, or a file: one name per line, or a JSON list."""
    path = Path(path)
    names = _classnames(classnames) if classnames is not None else None
    if path.is_dir():
        return _class_folder(path, names)
    if not path.exists():
        raise EvalDataError(f"{path}: no such file or folder")
    if names is None:
        _fail(path, "classnames", "a CSV needs a class-name list (one name per line, or a JSON list)")
    return _class_csv(path, names, Path(image_root) if image_root is not None else path.parent), names


def _classnames(classnames) -> list[str]:
    if isinstance(classnames, (list, tuple)):
        names = list(classnames)
        where = "classnames"
    else:
        where = Path(classnames)
        try:
            text = where.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EvalDataError(f"{where}: no such file") from None
        except UnicodeDecodeError as e:
            raise EvalDataError(f"{where}: not UTF-8 text ({e})") from None
        if text.lstrip().startswith("["):
            try:
                names = load_json(text)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{where}: not valid JSON ({e})") from None
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    names = _str_list(names, where, "classnames")
    if not names:
        _fail(where, "classnames", "empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        _fail(where, "classnames", f"{len(dup)} duplicate names, e.g. {dup[:3]}")
    return names


def _class_folder(root: Path, names: list[str] | None) -> tuple[list[ClassItem], list[str]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        _fail(root, "folder", "no class subfolders")
    if names is None:
        names = [p.name.replace("_", " ") for p in folders]
    elif len(names) != len(folders):
        _fail(root, "classnames", f"{len(names)} class names for {len(folders)} class folders")
    items = []
    for label, folder in enumerate(folders):
        items += [ClassItem(f.relative_to(root).as_posix(), str(f), label) for f in image_files(folder)]
    return items, names


def _class_csv(path: Path, names: list[str], root: Path) -> list[ClassItem]:
    index = {n: i for i, n in enumerate(names)}
    items = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            for col in ("image", "label"):
                if col not in cols:
                    _fail(path, col, f"missing column (the header has {cols})")
            for n, row in enumerate(reader, 2):
                where = f"{path}:{n}"
                image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
                if not image:
                    _fail(where, "image", "empty")
                if label.lstrip("-").isdigit():
                    k = int(label)
                    if not 0 <= k < len(names):
                        _fail(where, "label", f"index {k} outside the {len(names)} classes")
                elif label in index:
                    k = index[label]
                else:
                    _fail(where, "label", f"{label!r} is neither a class index nor a class name")
                item_id = (row.get("id") or "").strip() or str(n - 1)
                items.append(ClassItem(item_id, _resolve(root, image), k))
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise EvalDataError(f"{path}: not a valid CSV ({e})") from None
    return items


# ----------------------------------------------------------------------------- choices and labels


def _images(value, root: Path, where, field: str) -> list[str]:
    return [_resolve(root, p) for p in _str_list(value, where, field)]


def _placeholders(text: str, images: list, where, field: str):
    if text.count(IMAGE_PLACEHOLDER) != len(images):
        _fail(where, field, f"{text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders "
                            f"for {len(images)} images")


def load_choices(path, image_root=None) -> list[ChoiceItem]:
    """Yes/no and multiple-choice items (the Raven IQ protocol and similar) from JSONL, one per line:
    {"id", "images": [paths], "text": "... <image> ...", "candidates": [str | {"text", "images"}],
    "answer": int}. "id" defaults to the line number, "images" to [], "answer" to None (unknown)."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    items, seen = [], {}
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        the_id = str(item_id(obj, n, where, seen))
        images = _images(obj.get("images", []), root, where, "images")
        text = _get(obj, "text", str, where)
        _placeholders(text, images, where, "text")
        cands = _get(obj, "candidates", list, where)
        if not cands:
            _fail(where, "candidates", "empty")
        candidates = []
        for j, c in enumerate(cands):
            field = f"candidates[{j}]"
            if isinstance(c, str):
                candidates.append(c)
                continue
            if not isinstance(c, dict):
                _fail(where, field, f"expected a string or an object, got {type(c).__name__}")
            c_images = _images(c.get("images", []), root, where, f"{field}.images")
            c_text = c.get("text", IMAGE_PLACEHOLDER * len(c_images))
            if not isinstance(c_text, str):
                _fail(where, f"{field}.text", f"expected a string, got {type(c_text).__name__}")
            _placeholders(c_text, c_images, where, f"{field}.text")
            candidates.append({"text": c_text, "images": c_images})
        answer = obj.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, int)
                                   or not 0 <= answer < len(candidates)):
            _fail(where, "answer", f"expected a candidate index 0..{len(candidates) - 1}, got {answer!r:.40}")
        items.append(ChoiceItem(the_id, images, text, candidates, answer))
    return items


def load_labels(path, image_root=None) -> list[LabelItem]:
    """Open-vocabulary label items (NxTP) from JSONL {"id", "image", "labels": [...]}; "id" defaults to the
    line number, "labels" to [] (no references)."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    items, seen = [], {}
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        the_id = str(item_id(obj, n, where, seen))
        image = _get(obj, "image", str, where)
        labels = _str_list(obj.get("labels", []), where, "labels")
        items.append(LabelItem(the_id, _resolve(root, image), labels))
    return items


# ----------------------------------------------------------------------------- prompts, image folders, shards


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (any depth, by `kosmos.data.format.IMAGE_SUFFIXES`, the converters'
    list), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_image_folder(path: Path) -> list[Item]:
    """One item per image file under `path`, its id the path relative to `path` (no references)."""
    files = image_files(path)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return [Item(id=str(p.relative_to(path)), images=[p]) for p in files]


def load_prompts(path: Path, root: Path, questions: bool = False) -> list[Item]:
    """A JSONL of prompts without the benchmark's own format: {"id"?, "image", "question"? (`questions`),
    "captions"/"caption"? (references; with `questions`: "answers")}; a line that is not UTF-8 or JSON, a
    field of the wrong type or a repeated id is an EvalDataError naming the file, the line and the field."""
    items, seen = [], {}
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        the_id = item_id(row, len(items), where, seen)
        image = Path(_get(row, "image", str, where))
        question = _get(row, "question", str, where) if questions else ""
        name = "answers" if questions else ("captions" if "captions" in row else "caption")
        refs = row.get(name)
        refs = [refs] if isinstance(refs, str) else _str_list(refs or [], where, name)
        items.append(Item(id=the_id, images=[image if image.is_absolute() else root / image],
                          fields={"question": question}, references=refs))
    return items


def load_caption_shards(pattern: str) -> tuple[list[Item], Counter]:
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


def unique_ids(data: TaskData, where: str) -> TaskData:
    """`data`, or an EvalDataError naming two items with the same id: predictions are kept by id, so one of
    them would be dropped without a word."""
    seen: dict[str, int] = {}
    for i, item in enumerate(data.items, 1):
        first = seen.setdefault(item.key, i)
        if first != i:
            raise EvalDataError(f"{where}: items {first} and {i} have the same id {item.id!r}; every item "
                                "needs its own id")
    return data


# ----------------------------------------------------------------------------- likelihood-ranked choices


@dataclass
class RankedItem:
    """One multiple-choice item scored by the likelihood of each candidate (`kosmos.eval.kinds.ranked`):
    candidate j is the text `contexts[j]` followed by `continuations[j]`. Most tasks share one context and
    differ in the continuation; Winograd-style ones ("partial scoring") put each option into the context and
    share the continuation."""

    id: int | str
    contexts: list[str]
    continuations: list[str]
    """Scored after the context, leading space included (lm-evaluation-harness's target delimiter)."""
    choices: list[str]
    """The candidates' texts as lm-evaluation-harness's `doc_to_choice` gives them: acc_norm divides by
    their length in characters."""
    label: int | None
    """The right candidate, None when the file does not say (a test split)."""
    images: list[str] = field(default_factory=list)
    """Image paths for `{image}` markers in the task's prompt (rendered text, memes)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Template fields of the task's prompt (`jsonl` format: the row's other strings, e.g. `{object}`)."""


RANKED_FORMATS: dict[str, str] = {
    "storycloze": "StoryCloze 2016/2018: the CSV as distributed (InputSentence1..4, "
                  "RandomFifthSentenceQuiz1/2, AnswerRightEnding) or JSONL with the HF hub's names "
                  "(input_sentence_1..4, sentence_quiz1/2, answer_right_ending)",
    "hellaswag": "HellaSwag JSONL (hellaswag_val.jsonl as released, or the HF hub's rows): activity_label, "
                 "ctx_a, ctx_b, endings, label",
    "wsc273": "Winograd WSC273, the HF hub's winograd_wsc rows as JSONL: text, pronoun, pronoun_loc, "
              "options, label",
    "winogrande": "Winogrande JSONL (dev.jsonl / train_*.jsonl as released): sentence with _, option1, "
                  "option2, answer '1'/'2'",
    "piqa": "PIQA JSONL (goal, sol1, sol2) with its labels: a `label` field (the HF hub's rows) or the "
            "released labels file (`--annotations valid-labels.lst`, one 0/1 a line)",
    "boolq": "BoolQ, SuperGLUE JSONL: passage, question, label (true/false)",
    "cb": "CommitmentBank, SuperGLUE JSONL: premise, hypothesis, label (entailment/contradiction/neutral)",
    "copa": "COPA, SuperGLUE JSONL: premise, choice1, choice2, question (cause/effect), label",
    "hatefulmemes": "Hateful Memes JSONL as released (dev_seen.jsonl): id, img, label (1: hateful), text",
    "jsonl": "any choices as JSONL: {\"id\"?, \"choices\": [...], \"label\": index or the right choice's "
             "text, any other string fields for the prompt's {name}s} (the cross-modal probes)",
    "described": "classification with descriptions in context (CUB, the paper's section 4.7) as JSONL: "
                 "{\"id\"?, \"image\", \"category\" (e.g. woodpecker), \"descriptions\": {name: text, ...}, "
                 "\"label\": the right name or its index}; the candidates are the names",
    "class_folder": "a folder per class (Rendered SST-2 as released: negative/, positive/) or a CSV "
                    "image,label with class names; the candidates are the class names",
}
"""The formats `load_ranked` reads (TaskSpec.format), each as its benchmark distributes it."""

_CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing: WikiHow's bracketed artifacts out, ` [title]` to
    `. `."""
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_WSC_UPPER = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


def _wsc_option(text: str, pronoun: str, loc: int, option: str) -> str:
    """lm-evaluation-harness's WSC273 option normalisation: `'s` after a possessive pronoun's option, and the
    option's first word lower-cased unless it starts a sentence."""
    if pronoun.lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    first = option.split()[0]
    if not (loc >= 2 and text[loc - 2] == ".") and first in _WSC_UPPER:
        return option.replace(first, first.lower())
    return option


def _label(value, where, field: str, n: int, names: dict[str, int] | None = None) -> int | None:
    """A gold index from a label field: an int (or its string), a bool (BoolQ), a name in `names`; None for
    an absent, empty or -1 label (a test split's)."""
    if value is None or value == "" or value == -1:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and names and value in names:
        return names[value]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < n:
        _fail(where, field, f"expected a label 0..{n - 1}" + (f" or one of {sorted(names)}" if names else "")
              + f", got {value!r:.40}")
    return value


def _same_context(the_id, context: str, choices: list[str], label, delimiter: str = " ") -> RankedItem:
    return RankedItem(the_id, [context] * len(choices), [delimiter + c for c in choices], choices, label)


def _ranked_row(fmt: str, obj: dict, n: int, where, labels: list[str] | None, row: int = 0) -> RankedItem:
    """One item of format `fmt` from a row (`n`: its default id; `row`: its index, for a labels file)."""
    s = lambda key: _get(obj, key, str, where)  # noqa: E731 - a field that must be a string
    if fmt == "storycloze":
        hf = "input_sentence_1" in obj
        names = ([f"input_sentence_{i}" for i in range(1, 5)], ["sentence_quiz1", "sentence_quiz2"],
                 "answer_right_ending", "story_id") if hf else (
            [f"InputSentence{i}" for i in range(1, 5)],
            ["RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"],
            "AnswerRightEnding", "InputStoryid")
        gold = _label(obj.get(names[2]), where, names[2], 3)
        if gold == 0:
            _fail(where, names[2], "expected 1 or 2, got 0")
        return _same_context(obj.get(names[3], n), " ".join(s(k) for k in names[0]), [s(k) for k in names[1]],
                             None if gold is None else gold - 1)
    if fmt == "hellaswag":
        ctx = s("ctx_a") + " " + s("ctx_b").capitalize()
        endings = _str_list(_get(obj, "endings", list, where), where, "endings")
        return _same_context(obj.get("ind", n), _hellaswag_text(s("activity_label") + ": " + ctx),
                             [_hellaswag_text(e) for e in endings], _label(obj.get("label"), where, "label",
                                                                           len(endings)))
    if fmt == "wsc273":
        text = s("text").replace("  ", " ")
        pronoun, loc = s("pronoun"), _get(obj, "pronoun_loc", int, where)
        options = [_wsc_option(text, pronoun, loc, o) for o in _str_list(_get(obj, "options", list, where),
                                                                            where, "options")]
        target = " " + text[loc + len(pronoun):].strip()
        contexts = [text[:loc] + o for o in options]
        return RankedItem(obj.get("id", n), contexts, [target] * len(options), contexts,
                          _label(obj.get("label"), where, "label", len(options)))
    if fmt == "winogrande":
        sentence = s("sentence")
        if "_" not in sentence:
            _fail(where, "sentence", "has no _ to put an option in")
        i = sentence.index("_")
        options = [s("option1"), s("option2")]
        gold = _label(obj.get("answer"), where, "answer", 3)
        if gold == 0:
            _fail(where, "answer", "expected '1' or '2', got '0'")
        contexts = [sentence[:i] + o for o in options]
        return RankedItem(obj.get("qID", n), contexts, [" " + sentence[i + 1:].strip()] * 2, contexts,
                          None if gold is None else gold - 1)
    if fmt == "piqa":
        value = obj.get("label") if labels is None else (labels[row] if row < len(labels) else None)
        return _same_context(obj.get("id", n), f"Question: {s('goal')}\nAnswer:", [s("sol1"), s("sol2")],
                             _label(value, where, "label", 2))
    if fmt == "boolq":
        return _same_context(obj.get("idx", n), f"{s('passage')}\nQuestion: {s('question')}?\nAnswer:",
                             ["no", "yes"], _label(obj.get("label"), where, "label", 2))
    if fmt == "cb":
        return _same_context(obj.get("idx", n), f"{s('premise')}\nQuestion: {s('hypothesis')}. True, False, "
                             "or Neither?\nAnswer:", ["True", "False", "Neither"],
                             _label(obj.get("label"), where, "label", 3, _CB_LABELS))
    if fmt == "jsonl":
        choices = _str_list(_get(obj, "choices", list, where), where, "choices")
        if not choices:
            _fail(where, "choices", "empty")
        label = obj.get("label")
        if isinstance(label, str) and label in choices:
            label = choices.index(label)
        item = _same_context(obj.get("id", n), "", choices, _label(label, where, "label", len(choices)))
        item.fields = {k: v for k, v in obj.items()
                       if isinstance(v, str) and k not in ("id", "label", "context", "answer")}
        return item
    if fmt == "copa":
        question = s("question")
        if question not in ("cause", "effect"):
            _fail(where, "question", f"expected 'cause' or 'effect', got {question!r:.40}")
        connector = {"cause": "because", "effect": "therefore"}[question]
        choices = [" " + c[:1].lower() + c[1:] for c in (s("choice1"), s("choice2"))]
        return _same_context(obj.get("idx", n), s("premise").strip()[:-1] + f" {connector}", choices,
                             _label(obj.get("label"), where, "label", 2), delimiter="")
    raise ValueError(f"unknown ranked-choice format {fmt!r}; formats: {', '.join(RANKED_FORMATS)}")


def load_ranked(fmt: str, path, labels=None, image_root=None, classnames=None) -> list[RankedItem]:
    """Likelihood-ranked choice items from a benchmark file in format `fmt` (`RANKED_FORMATS`), the texts
    built as lm-evaluation-harness builds them (its task configs: contexts, choices, target delimiter).
    `labels`: PIQA's released labels file. Image tasks: `hatefulmemes` (JSONL, images relative to
    `image_root`, by default the file's folder) and `class_folder` (`load_classification`; candidates the
    class names)."""
    if fmt == "class_folder":
        items, names = load_classification(path, classnames, image_root)
        return [RankedItem(c.id, [""] * len(names), [" " + n for n in names], names, c.label, [c.image])
                for c in items]
    path = Path(path)
    if fmt == "described":
        root = Path(image_root) if image_root is not None else path.parent
        out, seen = [], {}
        for n, obj in read_jsonl(path):
            where = f"{path}:{n}"
            descriptions = _get(obj, "descriptions", dict, where)
            names = list(descriptions)
            if len(names) < 2 or not all(isinstance(v, str) for v in descriptions.values()):
                _fail(where, "descriptions", "expected an object of at least two {name: description text}")
            label = obj.get("label")
            label = names.index(label) if isinstance(label, str) and label in names else label
            context = " ".join(f"Description of {k}: {v}" for k, v in descriptions.items())
            item = _same_context(item_id(obj, n, where, seen), context, names,
                                 _label(label, where, "label", len(names)))
            item.images = [_resolve(root, _get(obj, "image", str, where))]
            item.fields = {"category": _get(obj, "category", str, where)}
            out.append(item)
        return out
    if fmt == "hatefulmemes":
        root = Path(image_root) if image_root is not None else path.parent
        out, seen = [], {}
        for n, obj in read_jsonl(path):
            where = f"{path}:{n}"
            item = _same_context(item_id(obj, n, where, seen), "", ["no", "yes"],
                                 _label(obj.get("label"), where, "label", 2))
            item.images = [_resolve(root, _get(obj, "img", str, where))]
            out.append(item)
        return out
    if fmt not in RANKED_FORMATS:
        raise ValueError(f"unknown ranked-choice format {fmt!r}; formats: {', '.join(RANKED_FORMATS)}")
    label_list = None
    if labels is not None:
        try:
            label_list = [line.strip() for line in Path(labels).read_text(encoding="utf-8").splitlines()
                          if line.strip()]
        except (FileNotFoundError, IsADirectoryError):
            raise EvalDataError(f"{labels}: no such file") from None
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        rows = read_jsonl(path)
    out, seen = [], {}
    if label_list is not None and len(label_list) != len(rows):
        _fail(labels, "labels", f"{len(label_list)} labels for the {len(rows)} rows of {path}")
    for row, (n, obj) in enumerate(rows):
        where = f"{path}:{n}"
        item = _ranked_row(fmt, obj, n if path.suffix.lower() != ".csv" else n - 1, where, label_list, row)
        key = str(item.id)
        if key in seen:
            _fail(where, "id", f"{item.id!r} is already the id of {seen[key]}; every item needs its own id")
        seen[key] = where
        out.append(item)
    return out


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV with a header; an EvalDataError naming the file for one that is not."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return [(n, row) for n, row in enumerate(csv.DictReader(f), 2)]
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise EvalDataError(f"{path}: not a valid CSV ({e})") from None


# ----------------------------------------------------------------------------- WebSRC


@dataclass
class WebQAItem:
    id: str
    """The question id of dataset.csv (`bo010000100000`: domain, website, page, question)."""
    image: str
    """The page's screenshot (processed_data/PAGE.png)."""
    context: str
    """The page's text, extracted from processed_data/PAGE.html (`html_text`)."""
    question: str
    answers: list[str]


def html_text(path) -> str:
    """The visible text of an HTML file: the character data outside <script>, <style>, <noscript> and
    <template>, whitespace collapsed to single spaces (Python's html.parser; nothing is run or fetched).
    The paper says only "the text extracted from the web page"; this is the extraction chosen here."""
    from html.parser import HTMLParser

    class _Text(HTMLParser):
        SKIP = {"script", "style", "noscript", "template"}

        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.skipping = 0

        def handle_starttag(self, tag, attrs):
            self.skipping += tag in self.SKIP

        def handle_endtag(self, tag):
            self.skipping -= tag in self.SKIP and self.skipping > 0

        def handle_data(self, data):
            if not self.skipping:
                self.parts.append(data)

    try:
        raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file (the page of a WebSRC question)") from None
    parser = _Text()
    parser.feed(raw)
    parser.close()
    return " ".join(" ".join(parser.parts).split())


def load_websrc(path, split: str | None = None) -> list[WebQAItem]:
    """WebSRC questions as released: a website's `dataset.csv` (question, id, element_id, answer_start,
    answer) beside its `processed_data/` (PAGE.html, PAGE.png), or the data folder holding
    DOMAIN/NN/dataset.csv for every website; with `split` (dev, train) only the websites that its
    dataset_split*.json in that folder lists (the released test set has no answers)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*/*/dataset.csv"))
        if not files:
            _fail(path, "folder", "no DOMAIN/NN/dataset.csv in it (WebSRC's data folder)")
        if split is not None:
            splits = sorted(path.glob("dataset_split*.json"))
            if not splits:
                _fail(path, "split", f"no dataset_split*.json to take split {split!r} from")
            table = read_json(splits[-1])
            if not isinstance(table, dict) or split not in table:
                known = ", ".join(sorted(table)) if isinstance(table, dict) else "none"
                _fail(splits[-1], "split", f"no split {split!r} (it has {known})")
            sites = set(_str_list(table[split], splits[-1], split))
            files = [f for f in files if f.parent.parent.name[:2] + f.parent.name in sites]
    else:
        files = [path]
    items, pages, seen = [], {}, {}
    for csv_path in files:
        site = csv_path.parent
        for n, row in _csv_rows(csv_path):
            where = f"{csv_path}:{n}"
            qid = (row.get("id") or "").strip()
            if len(qid) < 9:
                _fail(where, "id", f"expected a WebSRC question id like bo010000100000, got {qid!r:.40}")
            if qid in seen:
                _fail(where, "id", f"{qid!r} is already the id of {seen[qid]}; every item needs its own id")
            seen[qid] = where
            question = row.get("question")
            if not question:
                _fail(where, "question", "missing")
            page = site / "processed_data" / qid[2:9]
            if page not in pages:
                pages[page] = html_text(page.with_suffix(".html"))
            answer = row.get("answer")
            items.append(WebQAItem(qid, str(page.with_suffix(".png")), pages[page], question,
                                   [answer] if answer is not None else []))
    return items
