"""Extractive question answering (WebSRC): a generated answer per question, scored by exact match and F1 over
answer tokens after SQuAD's normalisation.

The normalisation is the official SQuAD v1.1 script's `normalize_answer` (lower-case, punctuation out, the
articles a/an/the out, whitespace collapsed), which WebSRC's own evaluation (`src/utils_evaluate.py` of
X-LANCE/WebSRC-Baseline) copies; EM and F1 are taken as the maximum over the references and averaged, x100.
F1 with an empty side follows WebSRC's evaluation (and SQuAD v2.0's): 1 when both are empty, else 0 (SQuAD
v1.1's script gives 0 whenever nothing is in common; the two differ only on empty answers). WebSRC's third
metric, POS (the answer's HTML element), needs a predicted element and is not computed.

The prompt is the paper's (section 4.4.1: its "Qusestion" typo kept, the screenshot before it): the page
text, then `Q: {question} A:`. Chosen here, not said by the paper: the page text is the visible text of the
page's HTML (`kosmos.eval.datasets.html_text`), cut at the end to what the model's context leaves (the
record says how many tokens were cut), and the answer is generated greedily, at most 20 tokens, up to a
newline.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register
from kosmos.eval.prompts import Skip, build_prompt, fill


@register
class ExtractiveQA(TaskKind):
    name = "extractive_qa"

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """WebSRC's data folder (the websites of `split`, by its dataset_split*.json) or one website's
        dataset.csv (every question)."""
        check_exists(data)
        from pathlib import Path

        items = ds.load_websrc(data, split if Path(data).is_dir() else None)
        return TaskData([Item(id=q.id, images=[q.image], references=q.answers,
                              fields={"question": q.question, "context": q.context}) for q in items],
                        id_key="id")

    def prompt(self, ctx, item) -> tuple:
        """(the prompt, the page text's tokens cut): the page text cut (from its end) to what the context
        leaves after the question and `max_new_tokens`."""
        spec, tok = ctx.spec, ctx.encoder.tokenizer
        images = [ctx.load(p) for p in item.images]
        question = item.fields["question"]
        empty = build_prompt(ctx.encoder, fill(spec.prompt, question=question, context=""), images)
        room = ctx.model.cfg.decoder.max_len - spec.max_new_tokens - len(empty.ids)
        if room < 0:
            raise Skip("prompt_too_long", f"{len(empty.ids)} tokens without the page text, "
                                          f"decoder.max_len {ctx.model.cfg.decoder.max_len}")
        ids = tok.encode(item.fields["context"])
        text = item.fields["context"] if len(ids) <= room else tok.decode(ids[:room])
        prompt = build_prompt(ctx.encoder, fill(spec.prompt, question=item.fields["question"], context=text),
                              images)
        while len(prompt.ids) + spec.max_new_tokens > ctx.model.cfg.decoder.max_len and text:
            text = text[: int(len(text) * 0.95)]  # decode/encode may not round-trip to the same length
            prompt = build_prompt(ctx.encoder, fill(spec.prompt, question=item.fields["question"],
                                                    context=text), images)
        return prompt, max(0, len(ids) - len(tok.encode(text)))

    def predict(self, ctx, items, prompts) -> list[dict]:
        texts = ctx.generate([p for p, _ in prompts])
        return [{"id": it.id, "prediction": text, "context_tokens_cut": cut}
                for it, (_, cut), text in zip(items, prompts, texts, strict=True)]

    def score(self, spec, items, records) -> dict:
        exact = [max(exact_match(r, records[it.key]["prediction"]) for r in it.references) for it in items]
        f1 = [max(f1_score(r, records[it.key]["prediction"]) for r in it.references) for it in items]
        n = len(items)
        return {"exact_match": round(100 * sum(exact) / n, 2), "f1": round(100 * sum(f1) / n, 2), "n": n}


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def exact_match(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    """Token F1 of the normalised answers; an empty side scores 1 when both are empty, else 0 (WebSRC's and
    SQuAD v2.0's rule)."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if not same:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)
