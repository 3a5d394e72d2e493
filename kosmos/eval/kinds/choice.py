"""Yes/no and multiple choice (the Raven IQ protocol): each candidate appended to the item's text in turn,
the prediction the candidate after which the answer word (`TaskSpec.answer`, "Yes") is most likely."""

from __future__ import annotations

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register
from kosmos.eval.prompts import build_prompt, fill


@register
class Choice(TaskKind):
    name = "choice"

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """JSONL {"id", "images", "text" with <image>, "candidates", "answer"}."""
        check_exists(data)
        return TaskData([Item(id=c.id, images=c.images, fields={"text": c.text}, candidates=c.candidates,
                              label=c.answer) for c in ds.load_choices(data, images)], id_key="id")

    def generates(self, spec) -> bool:
        return False

    def prepare(self, ctx):
        from kosmos.eval.ranking import class_continuations

        return class_continuations(ctx.encoder.tokenizer, ctx.spec.prompt.split("{candidate}")[-1],
                                   [ctx.spec.answer])[0][0]

    def prompt(self, ctx, item) -> list:
        """One prompt per candidate (no demonstrations)."""
        prompts = []
        for cand in item.candidates:
            text, cand_images = ((cand, []) if isinstance(cand, str)
                                 else (cand.get("text", ""), cand.get("images", [])))
            body = fill(ctx.spec.prompt, text=item.fields.get("text", ""),
                        candidate=text).replace("<image>", "{image}")
            images = [ctx.load(p) for p in [*item.images, *cand_images]]
            prompts.append(build_prompt(ctx.encoder, body, images))
        return prompts

    def predict(self, ctx, items, prompts) -> list[dict]:
        from kosmos.eval.ranking import next_token_logprobs

        out = []
        for it, cand_prompts in zip(items, prompts, strict=True):
            yes = next_token_logprobs(ctx.model, cand_prompts, [ctx.state])[:, 0]
            out.append({"id": it.id, "prediction": int(yes.argmax()), "scores": yes.tolist()})
        return out

    def has_reference(self, item) -> bool:
        return bool(item.references) or item.label is not None

    def score(self, spec, items, records) -> dict:
        correct = sum(records[it.key]["prediction"] == it.label for it in items)
        return {"accuracy": round(100 * correct / len(items), 2), "n": len(items)}
