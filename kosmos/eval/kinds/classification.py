"""Zero-shot classification: every class name ranked by its length-normalised log-likelihood after the
prompt (`constrained`), or a generated name taken on an exact match (`unconstrained`); top-1/top-k."""

from __future__ import annotations

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register


@register
class Classification(TaskKind):
    name = "classification"

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """A folder per class, or a CSV `image,label` with class names."""
        check_exists(data)
        items, names = ds.load_classification(data, classnames)
        return TaskData([Item(id=c.id, images=[c.image], label=c.label) for c in items], classnames=names,
                        id_key="id")

    def generates(self, spec) -> bool:
        return spec.mode == "unconstrained"

    def prepare(self, ctx):
        if spec_ranks(ctx.spec):
            from kosmos.eval.ranking import class_continuations

            # class_continuations takes the prompt's text after its last {image}
            return class_continuations(ctx.encoder.tokenizer, ctx.spec.prompt, ctx.data.classnames)
        return None

    def predict(self, ctx, items, prompts) -> list[dict]:
        if not spec_ranks(ctx.spec):
            names = [n.lower() for n in ctx.data.classnames]
            out = []
            for it, text in zip(items, ctx.generate(prompts), strict=True):
                norm = text.lower().strip().strip(".").strip()
                out.append({"id": it.id, "prediction": names.index(norm) if norm in names else -1,
                            "raw": text})
            return out
        import torch

        from kosmos.eval.ranking import continuation_logprobs

        scores = continuation_logprobs(ctx.model, prompts, [ctx.state] * len(prompts))
        out = []
        for it, row in zip(items, scores, strict=True):
            mean = torch.tensor([s / max(n, 1) for s, n in row])
            top = mean.topk(min(ctx.spec.top_k, len(mean))).indices.tolist()
            out.append({"id": it.id, "prediction": top[0], "top": top})
        return out

    def official_result(self, data, item, record) -> dict:
        pred = record["prediction"]
        return {"id": item.id, "prediction": data.classnames[pred] if pred >= 0 else record.get("raw", ""),
                "top": [data.classnames[i] for i in record.get("top", [])]}

    def has_reference(self, item) -> bool:
        return bool(item.references) or item.label is not None

    def score(self, spec, items, records) -> dict:
        top1 = sum(records[it.key]["prediction"] == it.label for it in items)
        out = {"top1": round(100 * top1 / len(items), 2), "n": len(items)}
        if spec_ranks(spec):
            topk = sum(it.label in records[it.key]["top"] for it in items)
            out[f"top{spec.top_k}"] = round(100 * topk / len(items), 2)
        return out


def spec_ranks(spec) -> bool:
    """Whether the classes are ranked (`mode: constrained`) rather than generated."""
    return spec.mode == "constrained"
