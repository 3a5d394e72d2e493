import itertools
from types import SimpleNamespace

import pytest
import torch

from kosmos.generate import GenerationConfig, Prompt, filter_logits, generate
from kosmos.weights import load_model
from tests.helpers import checkpoint_dir, make_row, random_images, tiny_model


def _prompt(model, before, n_images, after, seed):
    ids, mask = make_row(model, before, n_images, after, seed=seed)
    imgs = random_images(model, n_images, seed=seed) if n_images else None
    return Prompt(ids=ids[0].tolist(), image_mask=mask[0].tolist(), images=imgs)


@pytest.mark.parametrize("attention", ["sdpa", "torchscale"])
def test_cached_greedy_equals_uncached(attention):
    model = tiny_model(f"decoder.attention={attention}")
    prompt = _prompt(model, 3, 1, 4, seed=0)
    gen = GenerationConfig(max_new_tokens=24)
    cached = generate(model, [prompt], gen)
    uncached = generate(model, [prompt], GenerationConfig(max_new_tokens=24, use_cache=False))
    assert len(cached[0]) == 24
    assert cached == uncached


def test_cache_prefill_keeps_the_whole_prompt():
    # The trap: without is_first_step torchscale's cache keeps only the last prompt token. Two prompts
    # that share only their last token must then continue differently.
    model = tiny_model()
    a = Prompt(ids=[2, 11, 12, 13, 14, 15])
    b = Prompt(ids=[2, 91, 92, 93, 94, 15])
    out = generate(model, [a, b], GenerationConfig(max_new_tokens=8))
    assert out[0] != out[1]


def test_batch_of_different_lengths_matches_one_by_one():
    model = tiny_model()
    prompts = [_prompt(model, 2, 1, 3, seed=1), _prompt(model, 7, 2, 1, seed=2), Prompt(ids=[2, 40, 41])]
    gen = GenerationConfig(max_new_tokens=12)
    batched = generate(model, prompts, gen)
    alone = [generate(model, [p], gen)[0] for p in prompts]
    assert batched == alone


def test_stock_attention_falls_back_for_padded_batches():
    model = tiny_model("decoder.attention=torchscale")
    prompts = [Prompt(ids=[2, 40, 41, 42, 43]), Prompt(ids=[2, 50])]
    gen = GenerationConfig(max_new_tokens=6)
    assert generate(model, prompts, gen) == [generate(model, [p], gen)[0] for p in prompts]


def test_stops_at_eos():
    model = tiny_model()
    prompt = _prompt(model, 3, 1, 2, seed=3)
    free = generate(model, [prompt], GenerationConfig(max_new_tokens=10))[0]
    eos = free[4]
    stopped = generate(model, [prompt], GenerationConfig(max_new_tokens=10, eos_id=eos))[0]
    assert stopped == free[: free.index(eos)]


def test_sampling_controls():
    model = tiny_model()
    prompt = _prompt(model, 2, 1, 2, seed=4)
    greedy = generate(model, [prompt], GenerationConfig(max_new_tokens=8))
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1)) == greedy
    assert generate(model, [prompt], GenerationConfig(max_new_tokens=8, do_sample=True, top_p=1e-6)) == greedy
    hot = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=5.0)
    s1 = generate(model, [prompt], hot, generator=torch.Generator().manual_seed(0))
    s2 = generate(model, [prompt], hot, generator=torch.Generator().manual_seed(0))
    s3 = generate(model, [prompt], hot, generator=torch.Generator().manual_seed(1))
    assert s1 == s2 and s1 != greedy and s1 != s3


def test_filter_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, :2]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, 2:]).all()
    p = logits.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0])
    assert kept.tolist() == [False, False, True, True]
    assert p[3] < 0.7 <= p[3] + p[2]


def test_beam_search_with_all_beams_is_exhaustive():
    # With as many beams as the vocabulary and 2 steps, beam search must find the best 2-token sequence.
    model = tiny_model("decoder.vocab_size=12")
    prompt = Prompt(ids=[2, 7, 8, 9])
    best = generate(model, [prompt], GenerationConfig(max_new_tokens=2, num_beams=12, length_penalty=0.0))[0]
    ids = torch.tensor([prompt.ids])
    scores = {}
    with torch.no_grad():
        model.eval()
        for a, b in itertools.product(range(12), repeat=2):
            seq = torch.cat([ids, torch.tensor([[a, b]])], 1)
            logp = model(seq).logits.log_softmax(-1)
            scores[(a, b)] = (logp[0, -3, a] + logp[0, -2, b]).item()
    assert tuple(best) == max(scores, key=scores.get)
    # ...and cached and uncached beam search agree
    gen = GenerationConfig(max_new_tokens=5, num_beams=3)
    assert generate(model, [prompt], gen) == generate(model, [prompt], GenerationConfig(
        max_new_tokens=5, num_beams=3, use_cache=False))


def test_several_images_in_one_prompt():
    model = tiny_model()
    p = _prompt(model, 2, 3, 2, seed=5)
    gen = GenerationConfig(max_new_tokens=10)
    assert generate(model, [p], gen) == generate(model, [p],
                                                 GenerationConfig(max_new_tokens=10, use_cache=False))
    # each image reaches the prediction: changing only the middle one moves the next-token logits
    p2 = Prompt(ids=p.ids, image_mask=p.image_mask, images=p.images.clone())
    p2.images[1] = random_images(model, 1, seed=99)[0]
    model.eval()
    with torch.no_grad():
        ids, mask = torch.tensor([p.ids]), torch.tensor([p.image_mask])
        a = model(ids, p.images, mask).logits[0, -1]
        b = model(ids, p2.images, mask).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-4)


def test_generate_cli_with_a_checkpoint(tmp_path, tiny_tokenizer, capsys):
    from safetensors.torch import save_model

    from kosmos.generate import main
    from tests.helpers import ROOT

    model = tiny_model()
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    save_model(model, str(ckpt / "model.safetensors"))
    img = ROOT / "assets" / "images" / "coffee.jpg"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--checkpoint", str(ckpt), "--tokenizer",
            str(tiny_tokenizer.path), "--image", str(img), "--image", str(img), "--max-new-tokens", "5"]
    out = main([*args, "--prompt", "{image} and {image} show", "--prompt", "An image of"])
    assert len(out) == 2 and capsys.readouterr().out.startswith("{image} and {image} show")
    beams = main([*args, "--prompt", "An image of", "--beams", "3"])
    assert len(beams) == 1
    with pytest.raises(ValueError, match="2 images"):
        main([*args, "--prompt", "only {image} here"])
    # weights that do not fit the config are refused with the file named
    bad = tmp_path / "bad"
    bad.mkdir()
    save_model(tiny_model("decoder.dim=32", "decoder.ffn_dim=64"), str(bad / "model.safetensors"))
    with pytest.raises(Exception, match="model.safetensors"):
        main([*args[:2], "--checkpoint", str(bad), *args[4:], "--prompt", "x"])


def test_a_checkpoint_directory_is_all_generation_needs(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from kosmos.generate import main
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import ROOT

    model = tiny_model("tokenizer.path=/nowhere/tokenizer")  # the path at training time is gone now
    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no configs/ here: nothing may be read relative to the clone

    loaded = load_model(ckpt)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    enc = SequenceEncoder.from_config(loaded.cfg)
    assert enc.image_size == model.vision.image_size and enc.num_latents == model.num_latents
    assert len(enc.tokenizer) == len(tiny_tokenizer)

    img = ROOT / "assets" / "images" / "coffee.jpg"
    args = ["--image", str(img), "--prompt", "An image of", "--max-new-tokens", "4"]
    by_dir = main(["--checkpoint", str(ckpt), *args])
    by_run = main(["--checkpoint", str(tmp_path / "run"), *args])  # a run directory: its newest checkpoint
    assert by_dir == by_run and len(by_dir) == 1
    assert capsys.readouterr().out.count("An image of") == 2
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        main(["--checkpoint", str(elsewhere), *args])


def test_model_normalises_uint8_pixels_and_refuses_floats():
    from kosmos.image import CLIP_MEAN, CLIP_STD

    model = tiny_model().eval()
    pixels = random_images(model, 2)
    x = model.vision.normalize(pixels)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(x, (pixels.float() / 255 - mean) / std)
    # a model cast to bf16 normalises in fp32 and only then rounds (CLIP's statistics are not rounded first)
    assert torch.equal(model.to(torch.bfloat16).vision.normalize(pixels), x.to(torch.bfloat16))
    model.float()
    with pytest.raises(TypeError, match="uint8"):
        model.encode_images(x)
    s = model.vision.image_size
    with pytest.raises(ValueError, match=f"\\(N, 3, {s}, {s}\\)"):
        model.encode_images(torch.zeros(1, 3, s + 1, s + 1, dtype=torch.uint8))


def test_summary_cli(capsys):
    from kosmos.summary import main
    from tests.helpers import TINY

    counts = main([str(TINY), "decoder.layers=3"])
    text = capsys.readouterr().out
    assert "decoder 3 layers" in text and "total" in text
    assert counts["total"] == sum(counts[k]
                                  for k in ("vision", "resampler", "projection", "decoder", "embeddings"))


# ------------------------------------------------------------------------ control tokens and stop strings

# The tiny tokenizer's special ids (kosmos/tokenizer/build.py), as make_row uses them
SPECIAL = SimpleNamespace(pad_id=0, bos_id=2, eos_id=3, image_id=4, image_end_id=5,
                          decode=lambda ids: "".join(f"<{i}>" for i in ids))
CONTROL = {0, 2, 4, 5}


def _rig(model, bias: dict[int, float]):
    """Add `bias` to the model's output logits (a forward hook on the output projection)."""
    b = torch.zeros(model.cfg.decoder.vocab_size)
    for i, v in bias.items():
        b[i] = v
    return model.decoder.output_projection.register_forward_hook(lambda mod, inp, out: out + b.to(out.dtype))


_MODES = {
    "greedy": {},
    "sample": {"do_sample": True, "temperature": 1.5},
    "top_k": {"do_sample": True, "top_k": 3},
    "beam": {"num_beams": 3},
}


@pytest.mark.parametrize("mode", list(_MODES))
def test_control_tokens_are_never_generated(mode):
    model = tiny_model()
    prompt = _prompt(model, 3, 1, 2, seed=6)
    # a model that strongly prefers <image>, then </image>, <pad>, <s> (the demo's "<image> of<image> of")
    _rig(model, {4: 100.0, 5: 90.0, 0: 80.0, 2: 70.0})
    kw = _MODES[mode]
    g = torch.Generator().manual_seed(0)
    raw = generate(model, [prompt], GenerationConfig(max_new_tokens=8, **kw), generator=g)[0]
    assert 4 in raw  # the rig works: without suppression it is generated
    gen = GenerationConfig.for_tokenizer(SPECIAL, max_new_tokens=8, **kw)
    assert set(gen.suppress_ids) == CONTROL
    for batch in ([prompt], [prompt, Prompt(ids=[2, 40, 41])]):
        outs = generate(model, batch, gen, generator=torch.Generator().manual_seed(0))
        for out in outs:
            assert len(out) == 8 and not CONTROL & set(out), out


@pytest.mark.parametrize("mode", list(_MODES))
def test_eos_stays_allowed_when_control_tokens_are_suppressed(mode):
    model = tiny_model()
    prompt = _prompt(model, 3, 1, 2, seed=7)
    _rig(model, {4: 100.0, 3: 50.0})  # <image> first, then eos
    gen = GenerationConfig.for_tokenizer(SPECIAL, max_new_tokens=8, suppress_ids=[0, 2, 3, 4, 5],
                                         **_MODES[mode])  # eos listed too: it stays allowed
    assert generate(model, [prompt], gen, generator=torch.Generator().manual_seed(0)) == [[]]


@pytest.mark.parametrize("mode", list(_MODES))
def test_stop_strings_cut_the_output(mode):
    model = tiny_model()
    prompt = _prompt(model, 2, 1, 3, seed=8)
    _rig(model, {7: 100.0})  # every mode then generates 7 7 7 ...
    kw = _MODES[mode]
    free = generate(model, [prompt], GenerationConfig.for_tokenizer(SPECIAL, max_new_tokens=6, **kw),
                    generator=torch.Generator().manual_seed(0))
    assert free == [[7] * 6]
    for stop, n in ((["<7><7>"], 2), (["7>"], 1), (["<9>", "<7><7><7>"], 3)):
        gen = GenerationConfig.for_tokenizer(SPECIAL, max_new_tokens=6, stop=stop, **kw)
        assert generate(model, [prompt], gen, generator=torch.Generator().manual_seed(0)) == [[7] * n], stop


def test_stop_strings_in_a_batch_stop_each_row_alone():
    model = tiny_model()
    prompts = [_prompt(model, 2, 1, 3, seed=9), Prompt(ids=[2, 40, 41, 42])]
    gen = GenerationConfig.for_tokenizer(SPECIAL, max_new_tokens=10)
    free = generate(model, prompts, gen)
    stop = SPECIAL.decode([free[0][3]])
    cut = [next(n for n in range(1, len(f) + 1) if stop in SPECIAL.decode(f[:n])) if stop in SPECIAL.decode(f)
           else len(f) for f in free]
    stopped = generate(model, prompts,
                       GenerationConfig.for_tokenizer(SPECIAL, max_new_tokens=10, stop=[stop]))
    assert stopped == [f[:n] for f, n in zip(free, cut, strict=True)]
    assert cut[0] <= 4


def test_stop_needs_decode_and_cut_at_stop(tiny_tokenizer):
    from kosmos.generate import control_ids, cut_at_stop

    with pytest.raises(ValueError, match="decode"):
        GenerationConfig(stop=["."])
    assert control_ids(SPECIAL) == [0, 2, 4, 5]  # a tokenizer without <unk>
    assert control_ids(tiny_tokenizer) == [0, 1, 2, 4, 5]  # <pad> <unk> <s> <image> </image>: never generated
    # eos is never banned, even where a tokenizer's pad is its eos
    assert control_ids(SimpleNamespace(**{**vars(SPECIAL), "pad_id": 3, "unk_id": 1})) == [1, 2, 4, 5]
    assert cut_at_stop("a cat. A dog\n", [".", "\n"]) == "a cat"
    assert cut_at_stop("a cat", ["."]) == "a cat"


def test_generate_cli_stop_and_no_control_tokens(tmp_path, tiny_tokenizer, monkeypatch):
    import kosmos.generate
    from kosmos.generate import main
    from tests.helpers import ROOT

    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, tiny_model())
    load = kosmos.generate.load_for_inference

    def rigged_load(*a, **kw):  # the loaded model prefers <image> above all
        model, enc = load(*a, **kw)
        _rig(model, {enc.tokenizer.image_id: 100.0, enc.tokenizer.image_end_id: 90.0})
        return model, enc

    monkeypatch.setattr(kosmos.generate, "load_for_inference", rigged_load)
    img = ROOT / "assets" / "images" / "coffee.jpg"
    args = ["--checkpoint", str(ckpt), "--image", str(img), "--prompt", "Here is a picture:",
            "--max-new-tokens", "8"]
    free = main(args)[0]
    assert free and not any(t in free for t in ("<image>", "</image>", "<pad>", "<s>")), free
    stop = free.strip()[:2]
    assert stop and main([*args, "--stop", stop]) == [free[: free.index(stop)]]


# ----------------------------------------------------------------------------- issue 22 item 11


@pytest.mark.parametrize("field,value", [("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")),
                                         ("temperature", -1), ("temperature", float("inf")),
                                         ("max_new_tokens", -5), ("max_new_tokens", 0),
                                         ("max_new_tokens", 2.5),
                                         ("top_k", -1), ("num_beams", 0), ("length_penalty", float("nan"))])
def test_generation_config_refuses_settings_out_of_range_naming_them(field, value):
    from kosmos.generate import SettingError

    with pytest.raises(SettingError, match=f"^{field} must be ") as e:
        GenerationConfig(**{field: value})
    assert e.value.field == field and "\n" not in str(e.value)
    GenerationConfig(top_p=1.0, temperature=0, top_k=0, max_new_tokens=1, num_beams=1)  # the edges are fine


def test_generation_is_capped_at_the_context():
    model = tiny_model()
    prompt = Prompt(ids=[2] + list(range(10, 250)))  # 241 tokens; tiny: decoder.max_len 256
    with pytest.warns(UserWarning, match=r"max_new_tokens 100 capped at 15: .*decoder.max_len = 256"):
        out = generate(model, [prompt], GenerationConfig(max_new_tokens=100))  # 100000: minutes, before
    assert len(out[0]) == 15
    assert len(generate(model, [prompt], GenerationConfig(max_new_tokens=15))[0]) == 15  # fits: no warning
    with pytest.raises(ValueError, match=r"fills the model's context \(decoder.max_len = 256\)"):
        generate(model, [Prompt(ids=[2] + [10] * 300)], GenerationConfig(max_new_tokens=4))


def _cli_error(capsys, argv) -> str:
    from kosmos.generate import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_generate_cli_arguments_are_one_line_errors(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    import kosmos.generate
    from kosmos.generate import main
    from tests.helpers import ROOT, bomb_png, write

    loaded, load = [], kosmos.generate.load_for_inference
    monkeypatch.setattr(kosmos.generate, "load_for_inference",  # one model for the five runs
                        lambda *a, **kw: loaded[0] if loaded else loaded.append(load(*a, **kw)) or loaded[0])

    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--tokenizer", str(tiny_tokenizer.path),
            "--prompt", "An image of"]
    for bad, words in ((["--sample", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
                       (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
                       (["--max-new-tokens", "-5"], "--max-new-tokens -5: must be a whole number >= 1"),
                       (["--beams", "0"], "--beams 0: must be")):
        assert words in _cli_error(capsys, [*base, *bad])
    images = {"text.jpg": b"this is not an image" * 10, "bomb.png": bomb_png(30_000, 30_000)}
    for name, data in images.items():
        write(tmp_path / name, data)
    for name, reason in (("text.jpg", "corrupt_image"), ("bomb.png", "decompression_bomb"),
                         ("missing.jpg", "missing_image")):
        err = _cli_error(capsys, [*base, "--image", str(tmp_path / name)])
        assert f"--image {tmp_path / name}: {reason}" in err, err
    # a length beyond the context is capped there, and the CLI says so
    out = main([*base, "--max-new-tokens", "300"])
    assert len(out) == 1
    err = capsys.readouterr().err
    assert "note: --max-new-tokens 300 capped at" in err and "decoder.max_len = 256" in err


def test_eval_decoding_settings_are_checked_like_the_cli(tmp_path, capsys):
    from kosmos.eval import main
    from kosmos.eval.tasks import get_task

    with pytest.raises(ValueError, match="num_beams must be a whole number >= 1, got 0"):
        get_task("coco_captioning", num_beams=0)
    for bad in (["--max-new-tokens", "-5"], ["--set", "num_beams=0"], ["--set", "length_penalty=nan"]):
        with pytest.raises(SystemExit) as e:
            main(["run", "--checkpoint", str(tmp_path), "--task", "captioning", "--data", str(tmp_path),
                  *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and "must be" in err, err


def test_on_token_streams_each_row_and_ends_a_row_that_returns_false():
    model = tiny_model()
    prompts = [_prompt(model, 2, 1, 3, seed=5), Prompt(ids=[2, 40, 41])]
    gen = GenerationConfig(max_new_tokens=10)
    whole = generate(model, prompts, gen)
    seen: list[list[int]] = [[], []]

    def on_token(row, token):
        seen[row].append(token)
        return not (row == 1 and len(seen[1]) == 3)  # row 1 leaves after three tokens

    out = generate(model, prompts, gen, on_token=on_token)
    assert out == seen == [whole[0], whole[1][:3]]
    # A row that ends on its eos says so at once (None), while the other row goes on.
    eos = whole[0][4]
    assert eos not in whole[1], "pick another prompt: the eos must end row 0 only"
    calls: list[tuple[int, int | None]] = []
    out = generate(model, prompts, GenerationConfig(max_new_tokens=10, eos_id=eos),
                   on_token=lambda row, token: calls.append((row, token)))
    assert out == [whole[0][: whole[0].index(eos)], whole[1]]
    ended = calls.index((0, None))
    assert [t for r, t in calls[:ended] if r == 0] == out[0] and not any(r == 0 for r, _ in calls[ended + 1:])
    assert len([c for c in calls[ended:] if c[0] == 1]) > 0 and (1, None) not in calls  # row 1 ran to the end


def test_stock_attention_batches_prompts_of_one_length_together(monkeypatch):
    import kosmos.generate as g

    model = tiny_model("decoder.attention=torchscale")
    prompts = [Prompt(ids=[2, 40, 41, 42]), Prompt(ids=[2, 50]), Prompt(ids=[2, 60, 61, 62]),
               Prompt(ids=[2, 7])]
    gen = GenerationConfig(max_new_tokens=5)
    alone = [generate(model, [p], gen)[0] for p in prompts]
    batches = []
    sample = g._sample
    monkeypatch.setattr(g, "_sample", lambda dec, B, *a: batches.append(B) or sample(dec, B, *a))
    streamed: dict[int, list[int]] = {}
    out = generate(model, prompts, gen, on_token=lambda r, t: streamed.setdefault(r, []).append(t))
    assert out == alone and batches == [2, 2]
    assert [streamed[i] for i in range(4)] == alone
