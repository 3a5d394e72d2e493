"""Multiple choice ranked by likelihood, as lm-evaluation-harness's `multiple_choice` tasks: each candidate
is a (context, continuation) pair, scored by the summed log-probability of the continuation's tokens given
the context (the model's raw distribution, `kosmos.eval.ranking.continuation_logprobs`); the prediction is
the most likely candidate.

    acc       argmax of the summed log-likelihoods
    acc_norm  argmax of the log-likelihood divided by the candidate's length in characters: lm-evaluation-
              harness's `acc_norm` (`completion_len = len(choice)` of the choice string, without the
              target delimiter; its `acc_bytes` divides by UTF-8 bytes instead). Not reported for partial
              scoring, where the continuation is the same for every candidate.
    f1        with `metrics: [f1]` (CB, as lm-evaluation-harness reports it): the mean over the classes of
              each one's F1 against the rest.
    roc_auc   with `metrics: [roc_auc]` (HatefulMemes; two candidates, labels 0/1): the area under the ROC
              curve of the score log P(candidate 1) - log P(candidate 0), ties counted half (the paper
              reports it for HatefulMemes).

Texts: the readers (`kosmos.eval.datasets.load_ranked`, `RANKED_FORMATS`) build contexts and candidates
as lm-evaluation-harness's task configs do (lm_eval/tasks/*: HellaSwag's preprocessing, PIQA's "Question:
... Answer:", BoolQ's and CB's templates, COPA's connector), and `TaskSpec.prompt` wraps the context
(`{context}`; image tasks add `{image}` and the question). Trailing whitespace of a context moves to the
front of its continuation, and the continuation's tokens are those of context + continuation less the
context's, as lm-evaluation-harness's `_encode_pair` does.

Partial scoring (Winograd WSC273, Winogrande): each option is substituted into the sentence (the
context, up to the blank or pronoun) and the rest of the sentence after it, the same for every option, is
the continuation scored; as lm-evaluation-harness does (its `multiple_input` tasks). Where its v0.4 configs
put two spaces before a continuation (COPA's choices carry a leading space and the target delimiter adds
another; WSC273's target is the raw rest of the text after the delimiter), one space is used, as its v0.3
tasks and GPT-3's formats do.

CUB with descriptions (`cub`, the paper's section 4.7): the categories' descriptions ("Description of
NAME: TEXT", the form of the paper's Figure 1), a newline, the image, then the paper's question ("Question:
what is the name of {category} in the picture? Answer:", `category` as the row gives it, e.g. "the
woodpecker"); the names are ranked here, where the paper generates and takes an exact match. The newline
and the image's place after the descriptions are chosen here (Figure 1 shows them in that order).

Few-shot (`--shots k`, the paper: 0, 1 and 4): k demonstrations drawn at random (seeded per item) from the
support set, `--support` (the paper: the training set), each `demo` filled with the right candidate's
context and continuation, joined by `separator` (blank line: lm-evaluation-harness's `fewshot_delimiter`).
An item whose context and longest candidate do not fit the model's context is skipped (`prompt_too_long`),
never cut.
"""

from __future__ import annotations

import logging

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register
from kosmos.eval.prompts import Skip, build_prompt, fill

log = logging.getLogger(__name__)


@register
class Ranked(TaskKind):
    name = "ranked_choice"
    few_shot = True
    scorer_settings = ("format",)

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """The benchmark's file in `spec.format` (`kosmos.eval.datasets.RANKED_FORMATS`); `annotations`:
        PIQA's labels file; `classnames`: a class-folder task's names."""
        check_exists(data)
        items = ds.load_ranked(spec.format, data, labels=annotations, image_root=images,
                               classnames=classnames)
        return TaskData([Item(id=r.id, images=r.images, label=r.label, fields=r.fields,
                              candidates=[{"context": c, "continuation": t, "choice": ch}
                                          for c, t, ch in zip(r.contexts, r.continuations, r.choices,
                                                              strict=True)],
                              references=[] if r.label is None else [r.continuations[r.label]])
                         for r in items], id_key="id")

    def generates(self, spec) -> bool:
        return False

    def prompt(self, ctx, item) -> dict:
        """{"prompts": one per distinct context, "continuations": token ids per prompt, "where": (prompt,
        slot) of each candidate, "partial": whether the continuation is shared}."""
        from kosmos.eval.ranking import continuation_ids

        spec, tok = ctx.spec, ctx.encoder.tokenizer
        demos, images = [], []
        for d in ctx.shots.pick(item):
            gold = d.candidates[d.label]
            demos.append(fill(spec.demo, **d.fields, context=gold["context"], answer=gold["continuation"]))
            images.extend(d.images)
        images.extend(item.images)
        loaded = [ctx.load(p) for p in images]
        prompts, conts, index, where = [], [], {}, []
        for cand in item.candidates:
            text = spec.separator.join([*demos, fill(spec.prompt, **item.fields, context=cand["context"])])
            cont = cand["continuation"]
            stripped = text.rstrip()
            text, cont = stripped, text[len(stripped):] + cont  # lm-eval: trailing spaces go with the answer
            if text not in index:
                index[text] = len(prompts)
                prompts.append(build_prompt(ctx.encoder, text, loaded))
                conts.append([])
            p = index[text]
            ids = continuation_ids(tok, text, cont)
            if not len(ids):
                raise Skip("empty_candidate", f"candidate {len(where)} has no tokens")
            where.append((p, len(conts[p])))
            conts[p].append(ids)
        max_len = ctx.model.cfg.decoder.max_len
        longest = max(len(prompts[p].ids) - getattr(conts[p][j], "drop", 0) + len(conts[p][j])
                      for p, j in where)
        if longest > max_len:
            raise Skip("prompt_too_long",
                       f"{longest} tokens with the longest candidate, decoder.max_len {max_len}")
        partial = len({c["context"] for c in item.candidates}) > 1
        return {"prompts": prompts, "continuations": conts, "where": where, "partial": partial}

    def predict(self, ctx, items, prompts) -> list[dict]:
        from kosmos.eval.ranking import continuation_logprobs

        flat_p, flat_c, offsets = [], [], []
        for q in prompts:
            offsets.append(len(flat_p))
            flat_p += q["prompts"]
            flat_c += q["continuations"]
        scored = continuation_logprobs(ctx.model, flat_p, flat_c, batch_size=max(1, ctx.spec.batch_size) * 4)
        out = []
        for it, q, off in zip(items, prompts, offsets, strict=True):
            lls = [scored[off + p][j][0] for p, j in q["where"]]
            rec = {"id": it.id, "prediction": _argmax(lls), "scores": lls,
                   "tokens": [scored[off + p][j][1] for p, j in q["where"]]}
            if not q["partial"]:
                rec["prediction_norm"] = _argmax([s / max(len(c["choice"]), 1)
                                                  for s, c in zip(lls, it.candidates, strict=True)])
            out.append(rec)
        return out

    def official_result(self, data, item, record) -> dict:
        return {"id": item.id, "prediction": record["prediction"],
                **({"prediction_norm": record["prediction_norm"]} if "prediction_norm" in record else {})}

    def has_reference(self, item) -> bool:
        return item.label is not None

    def score(self, spec, items, records) -> dict:
        n = len(items)
        out = {"acc": round(100 * sum(records[it.key]["prediction"] == it.label for it in items) / n, 2)}
        if all("prediction_norm" in records[it.key] for it in items):
            out["acc_norm"] = round(100 * sum(records[it.key]["prediction_norm"] == it.label
                                              for it in items) / n, 2)
        if "f1" in spec.metrics:
            classes = max(len(it.candidates) for it in items)
            out["f1"] = round(100 * macro_f1([records[it.key]["prediction"] for it in items],
                                             [it.label for it in items], classes), 2)
        if "roc_auc" in spec.metrics:
            if not all(len(it.candidates) == 2 for it in items) or {it.label for it in items} != {0, 1}:
                log.warning("no roc_auc: it needs two candidates per item and both labels among the scored "
                            "items")
                out["n"] = n
                return out
            scores = [records[it.key]["scores"][1] - records[it.key]["scores"][0] for it in items]
            out["roc_auc"] = round(100 * roc_auc(scores, [it.label for it in items]), 2)
        out["n"] = n
        return out


def _argmax(values: list[float]) -> int:
    """The index of the largest value (the first of equal ones, as numpy.argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def macro_f1(preds: list[int], golds: list[int], classes: int) -> float:
    """The mean over the classes of each one's F1 against the rest, 0 for a class neither predicted nor
    true: lm-evaluation-harness's CB `f1` (`cb_multi_fi`, sklearn's binary f1_score per class)."""
    scores = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / classes


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """The area under the ROC curve: the probability that a positive (label 1) scores above a negative, ties
    counted half (the Mann-Whitney statistic, what sklearn.metrics.roc_auc_score computes)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        raise ValueError("ROC AUC needs both labels among the scored items")
    order = sorted(scores)
    rank: dict[float, float] = {}
    i = 0
    while i < len(order):  # average ranks (1-based) of tied scores
        j = i
        while j + 1 < len(order) and order[j + 1] == order[i]:
            j += 1
        rank[order[i]] = (i + j) / 2 + 1
        i = j + 1
    return (sum(rank[s] for s in pos) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


