"""Captioning: a generated caption per image, scored with the COCO caption metrics (CIDEr, BLEU, ...)."""

from __future__ import annotations

from pathlib import Path

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register


@register
class Captioning(TaskKind):
    name = "captioning"
    scorer_packages = ("pycocoevalcap",)
    few_shot = True

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """Karpathy's dataset_*.json (a split) or a COCO caption file; or, predictions only unless they carry
        captions, a folder of images, a JSONL of prompts, or caption shards (local, URLs, pipe:)."""
        from kosmos.data.remote import is_remote

        path = Path(data)
        if path.is_dir() and not any(path.glob("*.tar")):
            return TaskData(ds.load_image_folder(path))
        if path.suffix == ".jsonl":
            return TaskData(ds.load_prompts(path, Path(images) if images else path.parent), id_key="image_id")
        if ".tar" in data or path.is_dir() or "{" in data or is_remote(data):
            items, bad = ds.load_caption_shards(data)
            return TaskData(items, read_skipped=dict(bad))
        check_exists(data)
        root = images or str(path.parent)
        return TaskData([Item(id=c.id, images=[c.image], references=c.references)
                         for c in ds.load_captions(data, root, split=split)])

    def support_split(self, data: str) -> str | None:
        return "train" if Path(data).suffix == ".json" else None  # Karpathy's files have one

    def predict(self, ctx, items, prompts) -> list[dict]:
        return [{"id": it.id, "prediction": text}
                for it, text in zip(items, ctx.generate(prompts), strict=True)]

    def official_result(self, data, item, record) -> dict:
        return {data.id_key: item.id, "caption": record["prediction"]}

    def score(self, spec, items, records) -> dict:
        from kosmos.eval.caption_metrics import score_captions

        chosen = [m for m in spec.metrics if m != "SPICE"]
        return score_captions({it.key: it.references for it in items},
                              {it.key: records[it.key]["prediction"] for it in items},
                              spice="SPICE" in spec.metrics, **({"metrics": chosen} if chosen else {}))
