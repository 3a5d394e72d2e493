"""Scoring given candidates by their likelihood: zero-shot classification, yes/no and multiple choice.

    prompt = build_prompt(encoder, "The photo of the", [image])
    names = ["tabby cat", "golden retriever", ...]
    scores = rank_candidates(model, prompt, class_continuations(encoder.tokenizer, "The photo of the", names))
    best = names[max(range(len(names)), key=scores.__getitem__)]

`continuation_logprobs` gives, for each prompt and each of its candidate continuations, the summed
log-probability of the candidate's tokens after the prompt and their number. With the KV cache (the
default) a prompt, images included, is run once: prompts are prefilled together left-padded (as `generate`
does), the cache is copied to the candidate rows (`index_select` on the batch dim) and all of a chunk's
candidates follow as ONE right-padded block of tokens (right padding is harmless under causal attention:
the outputs at padded positions are never read). `use_cache=False` is the baseline that runs every
prompt + candidate sequence whole (batched, right-padded). Both give the same numbers to float tolerance.

With `decoder.attention=torchscale` the cached path is not possible (the stock attention cannot take a
block of new tokens after a cache, and turns left padding into NaN), so every candidate is scored on the
whole sequence, right-padded without a padding mask, which the stock attention runs correctly.

Control tokens: `generate` never produces `<pad>`, `<s>`, `<image>`, `</image>`, `<unk>` (`control_ids`),
but scoring here uses the model's raw distribution, a log-softmax over the whole vocabulary. A candidate
scored under a renormalised distribution would gain the same constant at every position for every
candidate after a given prompt (a ranking of candidates after one prompt does not change), but the
yes/no protocol compares P("Yes") across different prompts, where that constant differs: the raw
probability is the model's own, and what lm-evaluation-harness and OpenFlamingo score too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kosmos.generate import Prompt, _batch_prompts, _reorder_cache
from kosmos.model import evaluating

FILL_ID = 0
"""Token put at padded positions (`<pad>`); the outputs there are never read."""


class Continuation(list):
    """A candidate's token ids (a list of int) that replaces the prompt's last `drop` tokens instead of
    following the whole prompt. `class_continuations` makes one when the prompt text's own tokens are not a
    prefix of the tokens of prompt text + candidate (SentencePiece may split differently at the join);
    such a candidate is scored on its whole sequence (prompt ids less `drop`, then these ids) without the
    KV cache. A plain list is a Continuation with `drop` 0."""

    def __init__(self, ids: Sequence[int] = (), drop: int = 0):
        super().__init__(ids)
        self.drop = drop
        """How many of the prompt's last tokens these ids replace."""

    def __repr__(self) -> str:
        return f"Continuation({list(self)!r}, drop={self.drop})"


def _drop(candidate: Sequence[int]) -> int:
    return getattr(candidate, "drop", 0)


def _check(prompts: list[Prompt], continuations: list[list[list[int]]]) -> None:
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} lists of continuations")
    for i, (p, cands) in enumerate(zip(prompts, continuations, strict=True)):
        if not p.ids:
            raise ValueError(f"prompt {i} has no tokens (a prompt starts with <s>)")
        for j, c in enumerate(cands):
            d = _drop(c)
            if d < 0 or d >= len(p.ids):
                raise ValueError(f"prompt {i}, candidate {j}: drop={d} must be in [0, {len(p.ids)})")
            if d and p.image_mask is not None and any(p.image_mask[len(p.ids) - d:]):
                raise ValueError(f"prompt {i}, candidate {j}: drop={d} would cut into an image span")


@torch.no_grad()
def continuation_logprobs(model, prompts: list[Prompt], continuations: list[list[list[int]]], *,
                          use_cache: bool = True, batch_size: int = 64) -> list[list[tuple[float, int]]]:
    """For each prompt and each of its candidate continuations (token ids): (sum of log P(candidate's
    tokens | prompt), number of tokens). An empty candidate gives (0.0, 0).

    `batch_size`: candidate rows per forward pass, and prompts prefilled together. With `use_cache` each
    prompt is run once and its KV cache reused by its candidates; without, every prompt + candidate
    sequence is run whole (the baseline; also what `decoder.attention=torchscale` and candidates with a
    `drop` always get)."""
    _check(prompts, continuations)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = [[(0.0, 0)] * len(cands) for cands in continuations]
    cached = use_cache and model.cfg.decoder.attention == "sdpa"
    with evaluating(model):
        whole: list[tuple[int, int]] = []
        for start in range(0, len(prompts), batch_size):
            rows = [(i, j) for i in range(start, min(start + batch_size, len(prompts)))
                    for j, c in enumerate(continuations[i]) if len(c)]
            if not cached:
                whole += rows
                continue
            whole += [(i, j) for i, j in rows if _drop(continuations[i][j])]
            plain = [(i, j) for i, j in rows if not _drop(continuations[i][j])]
            if plain:
                _score_cached(model, prompts, continuations, plain, batch_size, out)
        if whole:
            _score_whole(model, prompts, continuations, whole, batch_size, out)
    return out


def _score_cached(model, prompts, continuations, rows, batch_size, out) -> None:
    """Prefill the prompts of `rows` once (left-padded), then score the candidates in chunks of
    `batch_size` rows, each chunk one block of right-padded tokens after a copy of its prompts' cache."""
    device = next(model.parameters()).device
    dec = model.decoder
    users = sorted({i for i, _ in rows})
    where = {i: k for k, i in enumerate(users)}  # prompt index -> row of the prefilled batch
    ids, image_mask, padding, images = _batch_prompts([prompts[i] for i in users], FILL_ID, device)
    embeds = model.embed(ids, images, image_mask if images is not None else None)
    padding = padding if bool(padding.any()) else None
    state: dict = {"is_first_step": True}
    h = dec(embeds, padding_mask=padding, incremental_state=state, features_only=True)  # (P, L, D)
    state["is_first_step"] = False
    first = dec.output_layer(h[:, -1]).float().log_softmax(-1)  # (P, V): each candidate's first token

    rows = sorted(rows, key=lambda r: len(continuations[r[0]][r[1]]))  # similar lengths share a chunk
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        cands = [continuations[i][j] for i, j in chunk]
        index = torch.tensor([where[i] for i, _ in chunk], device=device)
        head = torch.tensor([c[0] for c in cands], device=device)
        total = first.index_select(0, index).gather(1, head[:, None]).squeeze(1)  # (R,)
        T = max(len(c) for c in cands) - 1  # the last token of a candidate is a target, never an input
        if T > 0:
            tokens = torch.full((len(chunk), T + 1), FILL_ID, dtype=torch.long)
            for r, c in enumerate(cands):
                tokens[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            tokens = tokens.to(device)
            n = torch.tensor([len(c) - 1 for c in cands], device=device)
            valid = torch.arange(T, device=device)[None, :] < n[:, None]  # (R, T)
            sub = {key: dict(v) if isinstance(key, int) else v for key, v in state.items()}
            _reorder_cache(sub, index)  # a copy of each row's prompt cache: (R, H, L, hd) per layer
            pad = None
            if padding is not None:  # the prompts' left padding; the block's own padding is on the right
                pad = torch.cat([padding.index_select(0, index), padding.new_zeros((len(chunk), T))], dim=1)
            logits = dec(dec.embed_tokens(tokens[:, :-1]), padding_mask=pad, incremental_state=sub).float()
            total = total + _target_logprobs(logits, tokens[:, 1:], valid)
        # device->host sync once per chunk
        for (i, j), s, c in zip(chunk, total.tolist(), cands, strict=True):
            out[i][j] = (s, len(c))


def _score_whole(model, prompts, continuations, rows, batch_size, out) -> None:
    """Score each candidate on its whole sequence (prompt ids less `drop`, then the candidate), in chunks
    of `batch_size` right-padded rows without a padding mask (causal attention never reads the padding,
    and the stock torchscale attention runs it correctly)."""
    device = next(model.parameters()).device
    dec = model.decoder
    seqs, starts = [], []
    for i, j in rows:
        p, c = prompts[i], continuations[i][j]
        keep = len(p.ids) - _drop(c)
        mask = None if p.image_mask is None else list(p.image_mask[:keep]) + [False] * len(c)
        seqs.append(Prompt(ids=list(p.ids[:keep]) + list(c), image_mask=mask, images=p.images))
        starts.append(keep)
    order = sorted(range(len(rows)), key=lambda r: len(seqs[r].ids))
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        ids, image_mask, _, images = _batch_prompts([seqs[r] for r in chunk], FILL_ID, device, left=False)
        x = model.embed(ids, images, image_mask if images is not None else None)
        h = dec(x, features_only=True)  # (R, L, D)
        n = torch.tensor([len(continuations[rows[r][0]][rows[r][1]]) for r in chunk], device=device)
        start = torch.tensor([starts[r] for r in chunk], device=device)
        N = int(n.max())
        # Position start - 1 + t predicts the candidate's token t (at start + t).
        pos = (start[:, None] - 1 + torch.arange(N, device=device)[None, :]).clamp(max=ids.size(1) - 2)
        valid = torch.arange(N, device=device)[None, :] < n[:, None]
        hs = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))  # (R, N, D): only the positions scored
        logits = dec.output_layer(hs).float()
        total = _target_logprobs(logits, ids.gather(1, pos + 1), valid)
        for r, s in zip(chunk, total.tolist(), strict=True):  # device->host sync once per chunk
            i, j = rows[r]
            out[i][j] = (s, len(continuations[i][j]))


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over t of log_softmax(logits[:, t])[targets[:, t]] where `valid`. logits (R, T, V) fp32."""
    lp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (R, T)
    return lp.masked_fill(~valid, 0.0).sum(1)


def rank_candidates(model, prompt: Prompt, candidates: list[list[int]], normalize: bool = True,
                    **kw) -> list[float]:
    """A score per candidate for ranking them after `prompt` (higher is more likely): the mean
    log-probability per token (length-normalised, the paper's zero-shot classification) when `normalize`,
    else the sum. Keyword arguments go to `continuation_logprobs` (use_cache, batch_size)."""
    for j, c in enumerate(candidates):
        if not len(c):
            raise ValueError(f"candidate {j} has no tokens: nothing to score")
    scored = continuation_logprobs(model, [prompt], [candidates], **kw)[0]
    return [s / n if normalize else s for s, n in scored]


@torch.no_grad()
def next_token_logprobs(model, prompts: list[Prompt], token_ids: list[int], *,
                        batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), len(token_ids)) fp32 on the CPU: log P(token | prompt) for the position right after
    each prompt, from the raw distribution (control tokens included). For the yes/no protocol: each
    candidate appended to the question in turn, the prediction is the prompt with the highest P("Yes").
    Prompts are batched right-padded (no padding mask: works with both attention paths)."""
    if not prompts:
        return torch.zeros((0, len(token_ids)))
    for i, p in enumerate(prompts):
        if not p.ids:
            raise ValueError(f"prompt {i} has no tokens (a prompt starts with <s>)")
    device = next(model.parameters()).device
    dec = model.decoder
    wanted = torch.tensor(token_ids, dtype=torch.long, device=device)
    rows = []
    with evaluating(model):
        for k in range(0, len(prompts), batch_size):
            chunk = prompts[k:k + batch_size]
            ids, image_mask, _, images = _batch_prompts(chunk, FILL_ID, device, left=False)
            h = dec(model.embed(ids, images, image_mask if images is not None else None), features_only=True)
            last = torch.tensor([len(p.ids) - 1 for p in chunk], device=device)
            hs = h[torch.arange(len(chunk), device=device), last]  # (B, D): each prompt's last position
            rows.append(dec.output_layer(hs).float().log_softmax(-1).index_select(1, wanted).cpu())
    return torch.cat(rows)


def class_continuations(tokenizer, prompt_text: str, names: list[str]) -> list[list[int]]:
    """Each class name's token ids as a continuation of `prompt_text` (the text that ends the prompt;
    with `{image}` markers, the part after the last one), for `rank_candidates`.

    Leading space: the name follows the prompt text after one space ("The photo of the" + " " +
    "tabby cat"; none is added when the text is empty or already ends in whitespace), and the name's
    surrounding whitespace is stripped. The project's SentencePiece tokenizer adds no dummy prefix, so the
    space is part of the name's first piece ("▁tabby"): the ids are tokenizer.encode(text + " " + name)
    less the prompt text's own ids. When those are not a prefix (e.g. a prompt text ending in a space,
    whose "▁" joins the name's first word) the ids from the first difference on are returned as a
    `Continuation` whose `drop` replaces the prompt's differing last tokens; it is scored whole, without
    the KV cache."""
    text = prompt_text.split("{image}")[-1]
    sep = " " if text and not text[-1].isspace() else ""
    out: list[list[int]] = []
    for k, name in enumerate(names):
        name = name.strip()
        if not name:
            raise ValueError(f"class name {k} is empty")
        out.append(continuation_ids(tokenizer, text, sep + name))
    return out


def continuation_ids(tokenizer, text: str, continuation: str) -> list[int]:
    """The token ids of `continuation` (its text as it is: leading space included) after a prompt whose
    text ends with `text` (the part after its last `{image}`): tokenizer.encode(text + continuation) less
    the ids of `text`, as lm-evaluation-harness splits a (context, continuation) pair; when those are not a
    prefix (SentencePiece splits differently at the join) the ids from the first difference on, as a
    `Continuation` whose `drop` replaces the prompt's differing last tokens."""
    text = text.split("{image}")[-1]
    prompt_ids = tokenizer.encode(text)
    whole = tokenizer.encode(text + continuation)
    n = len(prompt_ids)
    if whole[:n] == prompt_ids:
        return whole[n:]
    same = next((i for i, (a, b) in enumerate(zip(prompt_ids, whole, strict=False)) if a != b),
                min(n, len(whole)))
    return Continuation(whole[same:], drop=n - same)
