"""Generation with a KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

    python -m kosmos.generate --checkpoint demo_out/run --image assets/images/chelsea.jpg \
        --prompt "An image of"

A checkpoint directory is all it needs (its config.yaml, model.safetensors and tokenizer/); a run's output
directory stands for its newest checkpoint.

Prompts of different lengths are left-padded into one batch; the padding is masked out of attention, and
xPos is relative, so every prompt decodes as it would alone (with `decoder.attention=torchscale`, whose
stock attention turns left padding into NaN, prompts of one length are batched together and the lengths
decode one after another). `on_token` streams each row's tokens as they come. The prefill runs with
`incremental_state["is_first_step"] = True` (without it torchscale keeps only the last prompt token).
A prompt is one document: the KV cache path never uses document masking (`decoder.document_mask`).

Control tokens are never generated: `GenerationConfig.for_tokenizer` (which the CLI uses) bans `<pad>`,
`<s>`, `<image>`, `</image>` (an image is never generated; eos stays allowed) and `<unk>` (byte fallback
spells every character, so no training text holds it and it decodes to nothing useful) in greedy,
sampling and beam search alike. `stop` strings (`--stop`) end a sequence once its decoded text contains one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kosmos.errors import KosmosError
from kosmos.model import Kosmos, evaluating
from kosmos.sequence import SequenceEncoder


@dataclass
class Prompt:
    """One prompt: token ids, where the image slots are, and its images (n, 3, H, W) in order."""

    ids: list[int]
    image_mask: list[bool] | None = None
    images: torch.Tensor | None = None


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    """Sample from the distribution (with temperature/top_k/top_p) instead of taking the argmax."""
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0: all)."""
    num_beams: int = 1
    """Beam search with this many beams (>1 ignores do_sample)."""
    length_penalty: float = 1.0
    """Beam scores are divided by length ** length_penalty when picking the final hypothesis."""
    eos_id: int | None = None
    """Stop a sequence at this token (not included in the output)."""
    pad_id: int = 0
    use_cache: bool = True
    """Decode with the KV cache (False recomputes the whole sequence each step: for tests and benches)."""
    suppress_ids: list[int] = field(default_factory=list)
    """Token ids never generated: their logits are -inf before greedy, sampling and beam search pick.
    `for_tokenizer` fills it with the control tokens (a model that has seen `<image>` after "Here is a
    picture:" would otherwise print it, though an image can never be generated). `eos_id` stays allowed
    even when listed."""
    stop: list[str] = field(default_factory=list)
    """Stop a sequence once its generated text (by `decode`) contains one of these strings. Its output
    then ends with the token that completed the stop string (a string may end inside a token, so the cut
    belongs to the text: `cut_at_stop`)."""
    decode: Callable[[list[int]], str] | None = None
    """Token ids -> text (the tokenizer's `decode`); needed by `stop` only."""

    def __post_init__(self) -> None:
        """The decoding settings are checked here, once for the CLI, evaluation and any other caller: a value
        out of range is a `SettingError` naming the field (`top_p=0` would otherwise end in "probability
        tensor contains either inf, nan or element < 0" mid-generation, a negative temperature or length
        would be accepted silently)."""
        _whole(self, "max_new_tokens", 1)
        _whole(self, "top_k", 0)
        _whole(self, "num_beams", 1)
        _number(self, "temperature", lambda v: v >= 0, ">= 0 (0: the most likely token, as greedy)")
        _number(self, "top_p", lambda v: 0 < v <= 1, "in (0, 1] (1: every token)")
        _number(self, "length_penalty", lambda v: True, "a number")
        if self.stop and self.decode is None:
            raise ValueError("GenerationConfig.stop needs decode (token ids -> text), e.g. tokenizer.decode")
        if any(not s for s in self.stop):
            raise ValueError("GenerationConfig.stop: an empty stop string would stop at once")

    def fit(self, prompt_tokens: int, max_len: int) -> GenerationConfig:
        """This config with `max_new_tokens` at most what the model's context (`decoder.max_len`) leaves after
        a prompt of `prompt_tokens` (itself when it fits). A prompt that fills the context is a ValueError."""
        room = max_len - prompt_tokens
        if room < 1:
            raise ValueError(f"the prompt is {prompt_tokens} tokens: it fills the model's context "
                             f"(decoder.max_len = {max_len}), no room to generate")
        return self if self.max_new_tokens <= room else dataclasses.replace(self, max_new_tokens=room)

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> GenerationConfig:
        """A config for a model trained with `tokenizer`: its eos and pad ids, its decode (for `stop`) and
        its control tokens suppressed (`control_ids`). Keyword arguments set or override any field."""
        defaults = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, suppress_ids=control_ids(tokenizer),
                        decode=tokenizer.decode)
        return cls(**{**defaults, **kwargs})


class SettingError(KosmosError, ValueError):
    """A decoding setting out of range; `field` is the GenerationConfig field (a CLI names its option)."""

    def __init__(self, field: str, value, problem: str):
        super().__init__(f"{field} must be {problem}, got {value!r}")
        self.field, self.value, self.problem = field, value, problem


def _whole(gen: GenerationConfig, name: str, least: int) -> None:
    value = getattr(gen, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SettingError(name, value, f"a whole number >= {least}")


def _number(gen: GenerationConfig, name: str, ok: Callable[[float], bool], problem: str) -> None:
    value = getattr(gen, name)
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not number or not ok(value):
        raise SettingError(name, value, problem)


def control_ids(tokenizer) -> list[int]:
    """The ids a model must never generate: `<pad>`, `<s>`, `<image>`, `</image>` and `<unk>` where the
    tokenizer has one (eos is not one)."""
    unk = getattr(tokenizer, "unk_id", None)
    ids = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id, tokenizer.image_end_id}
    if unk is not None and unk >= 0:
        ids.add(unk)
    return sorted(ids - {tokenizer.eos_id})


def context_note(wanted: int, room: int, prompt_tokens: int, max_len: int) -> str:
    """What `generate` says when it cuts `max_new_tokens` to the context."""
    return (f"max_new_tokens {wanted} capped at {room}: the prompt's {prompt_tokens} tokens and {room} new "
            f"ones fill the model's context (decoder.max_len = {max_len})")


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to its earliest stop string (the stop string itself left out)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _suppress_mask(gen: GenerationConfig, vocab_size: int, device) -> torch.Tensor | None:
    """(V,) bool, True at the ids never to generate (eos excepted), or None when there are none."""
    ids = sorted(set(gen.suppress_ids) - {gen.eos_id})
    if not ids:
        return None
    if ids[0] < 0 or ids[-1] >= vocab_size:
        raise ValueError(f"GenerationConfig.suppress_ids: ids must be in [0, {vocab_size}), got {ids}")
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return mask.to(device)


def _hits_stop(gen: GenerationConfig, ids: list[int]) -> bool:
    """Whether the generated ids' text contains a stop string (decoded whole: a stop string may span
    tokens, and decoding a suffix alone can differ at its first token)."""
    if not gen.stop:
        return False
    text = gen.decode(ids)
    return any(s in text for s in gen.stop)


def _batch_prompts(prompts: list[Prompt], pad_id: int, device, left: bool = True) -> tuple[torch.Tensor, ...]:
    """Left-pad (or with `left=False` right-pad) prompts into (B, L) ids, image mask and padding mask;
    concatenate their images."""
    L = max(len(p.ids) for p in prompts)
    B = len(prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    image_mask = torch.zeros((B, L), dtype=torch.bool)
    padding = torch.ones((B, L), dtype=torch.bool)
    images = []
    for i, p in enumerate(prompts):
        n = len(p.ids)
        span = slice(L - n, L) if left else slice(0, n)
        ids[i, span] = torch.tensor(p.ids, dtype=torch.long)
        padding[i, span] = False
        if p.image_mask is not None:
            image_mask[i, span] = torch.tensor(p.image_mask, dtype=torch.bool)
        if p.images is not None and len(p.images):
            images.append(p.images)
    imgs = torch.cat(images).to(device) if images else None
    return ids.to(device), image_mask.to(device), padding.to(device), imgs


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the most likely always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _reorder_cache(state: dict, index: torch.Tensor) -> None:
    for key, layer in state.items():
        if isinstance(key, int):
            for name in ("prev_key", "prev_value"):
                if name in layer:
                    layer[name] = layer[name].index_select(0, index)


class _Decoder:
    """Runs the decoder step by step, with or without the KV cache, over a batch of B rows."""

    def __init__(self, model: Kosmos, embeds: torch.Tensor, padding: torch.Tensor, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.padding = padding if bool(padding.any()) else None
        self.embeds = embeds  # uncached path: the whole sequence so far
        self.state: dict | None = {"is_first_step": True} if use_cache else None

    def first(self) -> torch.Tensor:
        logits = self.model.decoder(self.embeds, padding_mask=self.padding, incremental_state=self.state)
        if self.state is not None:
            self.state["is_first_step"] = False
        return logits[:, -1].float()  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.model.decoder.embed_tokens(tokens[:, None])  # (B, 1, D)
        if self.padding is not None:
            self.padding = torch.cat([self.padding, self.padding.new_zeros((len(tokens), 1))], dim=1)
        if self.use_cache:
            logits = self.model.decoder(emb, padding_mask=self.padding, incremental_state=self.state)
        else:
            self.embeds = torch.cat([self.embeds, emb], dim=1)
            logits = self.model.decoder(self.embeds, padding_mask=self.padding)
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index)
        if self.state is not None:
            _reorder_cache(self.state, index)
        else:
            self.embeds = self.embeds.index_select(0, index)


OnToken = Callable[[int, "int | None"], "bool | None"]
"""`on_token(row, token)`: called with each token as it is generated (greedy and sampling; beam search
picks its tokens at the end and calls nothing), then `on_token(row, None)` when the row ends before the
batch does (its eos, or a stop string: its output is complete). Returning False ends that row there (the
token stays in its output; no None call follows): a server ends a row whose client left, or that reached
its own token budget in a batch."""


@torch.no_grad()
def generate(model: Kosmos, prompts: list[Prompt], gen: GenerationConfig | None = None,
             generator: torch.Generator | None = None, on_token: OnToken | None = None) -> list[list[int]]:
    """New token ids for each prompt (the eos token is not included); at most what the model's context
    (`decoder.max_len`) leaves after the longest prompt (`GenerationConfig.fit`: a warning says when that
    cuts `max_new_tokens`; a prompt that fills the context is a ValueError). `on_token` streams the
    tokens of greedy and sampled rows (`OnToken`)."""
    gen = gen or GenerationConfig()
    longest, max_len = max(len(p.ids) for p in prompts), model.cfg.decoder.max_len
    fitted = gen.fit(longest, max_len)
    if fitted is not gen:
        warnings.warn(context_note(gen.max_new_tokens, fitted.max_new_tokens, longest, max_len), stacklevel=2)
        gen = fitted
    with evaluating(model):
        if model.cfg.decoder.attention == "torchscale" and len({len(p.ids) for p in prompts}) > 1:
            # The stock attention turns left padding into NaN: one batch per prompt length, one after another.
            return _by_length(model, prompts, gen, generator, on_token)
        device = next(model.parameters()).device
        ids, image_mask, padding, images = _batch_prompts(prompts, gen.pad_id, device)
        embeds = model.embed(ids, images, image_mask if images is not None else None)
        dec = _Decoder(model, embeds, padding, gen.use_cache)
        if gen.num_beams > 1:
            return _beam_search(dec, len(prompts), gen)
        return _sample(dec, len(prompts), gen, generator, on_token)


def _by_length(model: Kosmos, prompts: list[Prompt], gen: GenerationConfig, generator,
               on_token: OnToken | None) -> list[list[int]]:
    """`generate` over prompts of several lengths without padding: one batch for each length."""
    out: list[list[int]] = [[] for _ in prompts]
    for n in sorted({len(p.ids) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p.ids) == n]
        relay = None if on_token is None else (lambda r, t, rows=rows: on_token(rows[r], t))
        outs = generate(model, [prompts[i] for i in rows], gen, generator, relay)
        for i, ids in zip(rows, outs, strict=True):
            out[i] = ids
    return out


def _sample(dec: _Decoder, B: int, gen: GenerationConfig, generator,
            on_token: OnToken | None = None) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    logits = dec.first()
    banned = _suppress_mask(gen, logits.size(-1), logits.device)
    for step in range(gen.max_new_tokens):
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))  # before temperature, top-k and top-p
        if gen.do_sample:
            scaled = filter_logits(logits / max(gen.temperature, 1e-5), gen.top_k, gen.top_p)
            probs = scaled.softmax(-1)
            tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
        else:
            tokens = logits.argmax(-1)
        for i, t in enumerate(tokens.tolist()):  # device->host sync once per step
            if done[i]:
                continue
            if gen.eos_id is not None and t == gen.eos_id:
                done[i] = True
            else:
                out[i].append(t)
                done[i] = _hits_stop(gen, out[i])
                if on_token is not None and on_token(i, t) is False:
                    done[i] = True
                    continue
            if done[i] and on_token is not None:
                on_token(i, None)  # ended by eos or a stop string: its output is final
        if bool(done.all()) or step == gen.max_new_tokens - 1:
            break
        tokens = tokens.masked_fill(done.to(tokens.device), gen.pad_id)
        logits = dec.step(tokens)
    return out


def _beam_search(dec: _Decoder, B: int, gen: GenerationConfig) -> list[list[int]]:
    K = gen.num_beams
    logits = dec.first()  # (B, V)
    V = logits.size(-1)
    device = logits.device
    banned = _suppress_mask(gen, V, device)
    # Every beam starts from its prompt; only beam 0 is live at first so the K beams differ.
    dec.reorder(torch.arange(B, device=device).repeat_interleave(K))
    logits = logits.repeat_interleave(K, dim=0)  # (B*K, V)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    seqs = torch.zeros((B * K, 0), dtype=torch.long, device=device)
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    for step in range(gen.max_new_tokens):
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))  # scores over the allowed tokens only
        logp = logits.log_softmax(-1)  # (B*K, V)
        # A finished beam stays as it is: one continuation (pad) at no cost.
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, gen.pad_id] = 0.0
        logp = torch.where(finished[:, None], frozen, logp)
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        top, idx = cand.topk(K, dim=-1)  # (B, K)
        beam = idx // V + torch.arange(B, device=device)[:, None] * K  # (B, K) rows into B*K
        token = idx % V
        beam, token = beam.flatten(), token.flatten()
        was_finished = finished.index_select(0, beam)
        seqs = torch.cat([seqs.index_select(0, beam), token[:, None]], dim=1)
        lengths = lengths.index_select(0, beam) + (~was_finished).float()
        finished = was_finished | (token == gen.eos_id if gen.eos_id is not None
                                   else torch.zeros_like(was_finished))
        if gen.stop:  # a beam whose text now holds a stop string is finished (host sync: stop only)
            live = (~finished).nonzero().flatten().tolist()
            n = lengths.long().tolist()
            rows = seqs.tolist()
            hits = [r for r in live if _hits_stop(gen, rows[r][: n[r]])]
            finished[hits] = True
        scores = top
        if bool(finished.all()) or step == gen.max_new_tokens - 1:
            break
        dec.reorder(beam)
        logits = dec.step(token)
    norm = scores.flatten() / lengths.clamp(min=1) ** gen.length_penalty
    best = norm.view(B, K).argmax(-1) + torch.arange(B, device=device) * K
    out = []
    for row in best.tolist():
        toks = seqs[row, : int(lengths[row])].tolist()  # a finished beam's pad continuation left out
        if gen.eos_id is not None and gen.eos_id in toks:
            toks = toks[: toks.index(gen.eos_id)]
        out.append(toks)
    return out


# ----------------------------------------------------------------------------- loading and CLI


def build_prompt(encoder: SequenceEncoder, text: str, images: list[torch.Tensor]) -> Prompt:
    """A Prompt from text and uint8 images; `{image}` in `text` marks where each image goes (without it the
    images come first)."""
    seq = encoder.prompt(text, images)
    return Prompt(ids=seq.ids, image_mask=seq.image_mask, images=torch.stack(images) if images else None)


def load_for_inference(checkpoint: str | None = None, config: str | None = None, tokenizer: str | None = None,
                       overrides: list[str] | None = None,
                       device: str = "cpu") -> tuple[Kosmos, SequenceEncoder]:
    """(model in eval mode on `device`, its SequenceEncoder): `kosmos.weights.load_model` (a checkpoint
    directory, or a run directory, is enough; `config` builds the model from a YAML instead), then the
    sequence encoder of its config; `tokenizer` overrides the tokenizer directory."""
    from kosmos.weights import load_model

    model = load_model(checkpoint, config, overrides, device)
    if tokenizer:
        model.cfg.tokenizer.path = tokenizer
    return model, SequenceEncoder.from_config(model.cfg)


OPTIONS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
           "top_p": "--top-p", "num_beams": "--beams", "length_penalty": "--length-penalty"}
"""The CLI option of each checked GenerationConfig field."""


def main(argv: list[str] | None = None) -> list[str]:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.generate"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint directory, or a run's output dir (its newest "
                                         "checkpoint); its config.yaml and tokenizer/ are used")
    ap.add_argument("--config", help="YAML config or a shipped one's name (tiny, kosmos1) instead of the "
                                     "checkpoint's (random weights without --checkpoint)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's copy, "
                                        "or tokenizer.path)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    ap.add_argument("--prompt", action="append", default=None,
                    help="prompt text; `{image}` marks where each image goes (default: images first). "
                         "Repeat for a batch of prompts (each gets all --image files)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--beams", "--num-beams", dest="beams", type=int, default=1,
                    help="beam search with this many beams (--num-beams: the same, as in kosmos.eval run)")
    ap.add_argument("--stop", action="append", default=[],
                    help="stop a sequence when its text contains this string (printed without it); "
                         "repeat for several")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    if not args.checkpoint and not args.config:
        ap.error("give --checkpoint DIR (or --config YAML for a randomly initialised model)")
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, num_beams=args.beams)
    try:  # checked before the model is loaded
        GenerationConfig(**settings)
    except SettingError as e:
        ap.exit(2, f"error: {OPTIONS[e.field]} {e.value}: must be {e.problem}\n")

    torch.manual_seed(args.seed)
    model, enc = load_for_inference(args.checkpoint, args.config, args.tokenizer, args.overrides, args.device)
    from kosmos.untrusted import ImageError

    images = []
    for path in args.image:
        try:
            images.append(enc.load_image(path))
        except ImageError as e:
            detail = e.detail.removeprefix(str(path)).lstrip(": ")  # the path is named once
            ap.exit(2, f"error: --image {path}: {e.reason}" + (f" ({detail})" if detail else "") + "\n")
    tok = enc.tokenizer
    prompts = [build_prompt(enc, text, images) for text in (args.prompt or [""])]
    gen = GenerationConfig.for_tokenizer(tok, stop=args.stop, **settings)
    longest, max_len = max(len(p.ids) for p in prompts), model.cfg.decoder.max_len
    try:
        fitted = gen.fit(longest, max_len)
    except ValueError as e:
        ap.exit(2, f"error: {e}\n")
    if fitted is not gen:
        print(f"note: --{context_note(gen.max_new_tokens, fitted.max_new_tokens, longest, max_len)}"
              .replace("max_new_tokens", "max-new-tokens", 1), file=sys.stderr)
        gen = fitted
    g = torch.Generator().manual_seed(args.seed)
    outs = generate(model, prompts, gen, generator=g)
    texts = []
    for text, ids in zip(args.prompt or [""], outs, strict=True):
        texts.append(cut_at_stop(tok.decode(ids), args.stop))
        print(f"{text}{texts[-1]}")
    return texts


if __name__ == "__main__":
    from kosmos.errors import run_cli

    raise SystemExit(run_cli(main))
