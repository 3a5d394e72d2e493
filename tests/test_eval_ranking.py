"""kosmos.eval.ranking: candidate log-likelihoods with the prompt's KV cache reused, against whole sequences
run one at a time through the plain forward."""

import pytest
import torch

from kosmos.eval.ranking import (
    Continuation,
    class_continuations,
    continuation_logprobs,
    next_token_logprobs,
    rank_candidates,
)
from kosmos.generate import Prompt, build_prompt
from kosmos.sequence import SequenceEncoder
from tests.helpers import make_row, random_images, tiny_model


def _prompt(model, before, n_images, after, seed):
    ids, mask = make_row(model, before, n_images, after, seed=seed)
    imgs = random_images(model, n_images, seed=seed) if n_images else None
    return Prompt(ids=ids[0].tolist(), image_mask=mask[0].tolist(), images=imgs)


def _reference(model, prompt: Prompt, cand: list[int], drop: int = 0) -> float:
    """log P(cand | prompt ids less `drop`) from the model's plain forward over the one whole sequence."""
    keep = len(prompt.ids) - drop
    ids = torch.tensor([prompt.ids[:keep] + list(cand)])
    mask = None
    if prompt.image_mask is not None:
        mask = torch.tensor([prompt.image_mask[:keep] + [False] * len(cand)])
    model.eval()
    with torch.no_grad():
        logp = model(ids, prompt.images, mask).logits[0].float().log_softmax(-1)
    return sum(logp[keep - 1 + t, tok].item() for t, tok in enumerate(cand))


def _mixed(model):
    """Prompts of different lengths, with one, none and two images, and candidates of 1 to 5 tokens."""
    prompts = [_prompt(model, 2, 1, 3, seed=1), Prompt(ids=[2, 40, 41]), _prompt(model, 5, 2, 1, seed=2)]
    conts = [[[17], [30, 31, 32], [99, 98, 97, 96, 95], [30, 31]],
             [[50, 51], [7]],
             [[60, 61, 62, 63], [12], [60, 61]]]
    return prompts, conts


@pytest.mark.parametrize("use_cache", [True, False])
def test_continuation_logprobs_equal_the_plain_forward(use_cache):
    model = tiny_model()
    prompts, conts = _mixed(model)
    # batch_size 2: two prompt groups, and chunks that mix prompts and lengths
    got = continuation_logprobs(model, prompts, conts, use_cache=use_cache, batch_size=2)
    for p, cands, scores in zip(prompts, conts, got, strict=True):
        for c, (s, n) in zip(cands, scores, strict=True):
            assert n == len(c)
            assert s == pytest.approx(_reference(model, p, c), abs=1e-4)
    # the same whatever the batching
    one = continuation_logprobs(model, prompts, conts, use_cache=use_cache, batch_size=64)
    flat = [s for r in got for s, _ in r]
    assert flat == pytest.approx([s for r in one for s, _ in r], abs=1e-4)


def test_the_cache_runs_each_prompt_once():
    model = tiny_model()
    prompt = _prompt(model, 2, 1, 3, seed=3)
    cands = [[10 + k, 20 + k, 30][: 1 + k % 3] for k in range(7)]
    seen = []
    model.vision.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    calls = []
    model.decoder.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape),
                                            with_kwargs=True)
    cached = continuation_logprobs(model, [prompt], [cands], batch_size=4)[0]
    assert sum(seen) == 1  # the image is encoded once
    # one prefill of the prompt, then two chunks of at most 4 candidates, each one block of <= 2 inputs
    assert [tuple(s[:2]) for s in calls] == [(1, len(prompt.ids)), (4, 1), (3, 2)]
    seen.clear()
    whole = continuation_logprobs(model, [prompt], [cands], use_cache=False, batch_size=4)[0]
    assert sum(seen) == len(cands)  # the baseline encodes the image again for every candidate
    assert [s for s, _ in cached] == pytest.approx([s for s, _ in whole], abs=1e-4)


def test_empty_candidates_and_prompts_without_candidates():
    model = tiny_model()
    prompts = [Prompt(ids=[2, 40, 41]), Prompt(ids=[2, 42])]
    got = continuation_logprobs(model, prompts, [[[], [7, 8]], []])
    assert got[0][0] == (0.0, 0) and got[0][1][1] == 2 and got[1] == []
    with pytest.raises(ValueError, match="candidate 0 has no tokens"):
        rank_candidates(model, prompts[0], [[], [7]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        continuation_logprobs(model, prompts, [[[7]]])
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        continuation_logprobs(model, [Prompt(ids=[])], [[[7]]])


def test_stock_attention_falls_back_to_whole_sequences():
    model = tiny_model("decoder.attention=torchscale")
    prompts, conts = _mixed(model)
    got = continuation_logprobs(model, prompts, conts, batch_size=3)  # use_cache=True asked for
    flat = [s for r in got for s, _ in r]
    assert all(torch.isfinite(torch.tensor(flat)))  # left padding would have given NaN
    want = [_reference(model, p, c) for p, cs in zip(prompts, conts, strict=True) for c in cs]
    assert flat == pytest.approx(want, abs=1e-4)
    sdpa = continuation_logprobs(tiny_model(), prompts, conts)  # same seed, same weights
    assert flat == pytest.approx([s for r in sdpa for s, _ in r], abs=1e-4)
    tok = next_token_logprobs(model, prompts, [7, 8, 9])
    assert torch.isfinite(tok).all()


def test_a_continuation_with_drop_replaces_the_prompt_tail():
    model = tiny_model()
    prompt = _prompt(model, 2, 1, 3, seed=4)
    cands = [[30, 31], Continuation([33, 34, 35], drop=2), Continuation([36], drop=1)]
    for use_cache in (True, False):
        got = continuation_logprobs(model, [prompt], [cands], use_cache=use_cache)[0]
        assert [n for _, n in got] == [2, 3, 1]
        assert [s for s, _ in got] == pytest.approx(
            [_reference(model, prompt, c, drop=getattr(c, "drop", 0)) for c in cands], abs=1e-4)
    with pytest.raises(ValueError, match="cut into an image span"):
        continuation_logprobs(model, [prompt], [[Continuation([7], drop=5)]])  # text, </image>, a slot
    with pytest.raises(ValueError, match="drop=9 must be in"):
        continuation_logprobs(model, [Prompt(ids=[2, 40])], [[Continuation([7], drop=9)]])


def test_rank_candidates_normalises_by_length():
    model = tiny_model()
    prompt = _prompt(model, 2, 1, 2, seed=5)
    cands = [[10], [11, 12, 13], [14, 15]]
    sums = [_reference(model, prompt, c) for c in cands]
    assert rank_candidates(model, prompt, cands, normalize=False) == pytest.approx(sums, abs=1e-4)
    means = [s / len(c) for s, c in zip(sums, cands, strict=True)]
    assert rank_candidates(model, prompt, cands) == pytest.approx(means, abs=1e-4)
    assert rank_candidates(model, prompt, cands, use_cache=False, batch_size=1) == pytest.approx(
        rank_candidates(model, prompt, cands), abs=1e-4)
    model.train()
    rank_candidates(model, prompt, cands)
    assert model.training  # the mode is given back


def test_next_token_logprobs():
    model = tiny_model()
    prompts = [_prompt(model, 2, 1, 3, seed=6), Prompt(ids=[2, 40, 41]), _prompt(model, 1, 2, 4, seed=7)]
    got = next_token_logprobs(model, prompts, [3, 17, 4], batch_size=2)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    for p, row in zip(prompts, got, strict=True):
        assert row.tolist() == pytest.approx([_reference(model, p, [t]) for t in (3, 17, 4)], abs=1e-4)
    # the raw distribution: a control token (<image>, 4) has its own probability, not -inf
    assert torch.isfinite(got[:, 2]).all()
    assert next_token_logprobs(model, [], [3]).shape == (0, 1)


def test_class_continuations(tiny_tokenizer):
    tok = tiny_tokenizer
    names = ["circle", "red square", " small triangle "]
    text = "The photo of the"
    conts = class_continuations(tok, text, names)
    for name, c in zip(names, conts, strict=True):
        assert type(c) is list and c  # plain continuations of the prompt's own ids
        assert tok.encode(text) + c == tok.encode(text + " " + name.strip())
        assert tok.decode(c) == " " + name.strip()
    assert class_continuations(tok, "{image}" + text, names) == conts  # the text after the image
    # A prompt text ending in a space: its "▁" joins a name's first piece when the vocabulary has
    # "▁circle", so the prompt's ids are no prefix and the candidate replaces the prompt's last token;
    # "red" has no such piece ("▁" "red"), and its ids follow the prompt's.
    spaced = class_continuations(tok, text + " ", names)
    assert [getattr(c, "drop", 0) for c in spaced] == [1, 0, 1]
    assert isinstance(spaced[0], Continuation) and type(spaced[1]) is list
    prompt_ids = tok.encode(text + " ")
    for name, c in zip(names, spaced, strict=True):
        kept = prompt_ids[:len(prompt_ids) - getattr(c, "drop", 0)]
        assert kept + c == tok.encode(text + " " + name.strip())
    with pytest.raises(ValueError, match="class name 1 is empty"):
        class_continuations(tok, text, ["cat", "  "])


def test_zero_shot_classification_with_and_without_a_trailing_space(tiny_tokenizer):
    # Both prompt texts give the same token sequences for these names (one through the cache, one through
    # the whole-sequence fallback for continuations with drop), so the same scores.
    model = tiny_model()
    enc = SequenceEncoder(tiny_tokenizer, model.num_latents, model.vision.image_size)
    image = random_images(model, 1, seed=8)[0]
    names = ["circle", "small triangle", "square"]
    scores = {}
    for text in ("The photo of the", "The photo of the "):
        prompt = build_prompt(enc, text, [image])
        conts = class_continuations(tiny_tokenizer, text, names)
        assert [getattr(c, "drop", 0) for c in conts] == ([0, 0, 0] if text.endswith("the") else [1, 1, 1])
        scores[text] = rank_candidates(model, prompt, conts)
    assert scores["The photo of the"] == pytest.approx(scores["The photo of the "], abs=1e-4)
    # ...and the image matters
    other = build_prompt(enc, "The photo of the", [random_images(model, 1, seed=9)[0]])
    moved = rank_candidates(model, other, class_continuations(tiny_tokenizer, "The photo of the", names))
    assert moved != pytest.approx(scores["The photo of the"], abs=1e-4)
