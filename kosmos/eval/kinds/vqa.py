"""Visual question answering: a generated short answer per question, scored by VQA accuracy under a named
convention (`TaskSpec.vqa_rules`, `kosmos.eval.vqa_metrics`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register


@register
class VQA(TaskKind):
    name = "vqa"
    scorer_settings = ("vqa_rules",)
    few_shot = True

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """VQAv2 / OK-VQA questions (+ annotations) or VizWiz's single file; or a JSONL of prompts with
        questions (answers optional)."""
        path = Path(data)
        if path.is_dir() and not any(path.glob("*.tar")):
            raise ValueError(f"{data}: a folder of images has no questions; give a JSONL of "
                             '{"image", "question"} rows')
        if path.suffix == ".jsonl":
            items = ds.load_prompts(path, Path(images) if images else path.parent, questions=True)
            return TaskData(items, id_key="question_id")
        check_exists(data)
        vqa = ds.load_vqa(data, annotations, images or str(path.parent))
        vizwiz = bool(vqa) and isinstance(vqa[0].id, str) and annotations is None
        return TaskData([Item(id=q.id, images=[q.image], fields={"question": q.question},
                              references=q.answers,
                              extra={"answer_type": q.answer_type, "question_type": q.question_type,
                                     "answerable": q.answerable})
                         for q in vqa], id_key="image" if vizwiz else "question_id")

    def demo_answer(self, item, rng) -> str:
        """The most common annotator answer."""
        return Counter(item.references).most_common(1)[0][0]

    def predict(self, ctx, items, prompts) -> list[dict]:
        from kosmos.eval.vqa_metrics import postprocess_answer

        return [{"id": it.id, "prediction": postprocess_answer(text), "raw": text}
                for it, text in zip(items, ctx.generate(prompts), strict=True)]

    def official_result(self, data, item, record) -> dict:
        return {data.id_key: item.id, "answer": record["prediction"]}

    def score(self, spec, items, records) -> dict:
        from kosmos.eval.vqa_metrics import score_vqa

        return score_vqa({it.key: it.references for it in items},
                         {it.key: records[it.key]["prediction"] for it in items},
                         answer_types={it.key: it.extra.get("answer_type") for it in items},
                         question_types={it.key: it.extra.get("question_type") for it in items},
                         rules=spec.vqa_rules,
                         answerable={it.key: it.extra.get("answerable") for it in items})
