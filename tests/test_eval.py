import json

import pytest
import torch

from tests.helpers import caption_shards, checkpoint_dir, text_shards, tiny_model


def test_eval_cli_reports_the_token_mean_loss_per_source(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    from kosmos.data.packing import to_device
    from kosmos.eval import main, source_loss

    model = tiny_model("data.captions.micro_batch_size=2", "data.text.micro_batch_size=2")
    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, model)
    caps = caption_shards(tmp_path / "cap", 1, 40)  # several micro-batches of 2 rows
    texts = text_shards(tmp_path / "txt", 1, 5)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(ckpt), "--shards", f"captions={caps[0]}", "--shards", f"text={texts[0]}",
                 "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"text", "captions"}
    printed = capsys.readouterr().out
    assert "captions" in printed and "ppl" in printed

    # the same number by hand: summed token losses over all micro-batches / all target tokens
    from kosmos.data import build_loader
    from kosmos.sequence import SequenceEncoder
    from kosmos.weights import load_model

    loaded = load_model(ckpt)
    loaded.cfg.data.captions.eval_shards = caps
    enc = SequenceEncoder.from_config(loaded.cfg)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for batch in build_loader(loaded.cfg, "captions", enc, train=False):
            o = loaded(**to_device(batch, "cpu"))
            loss_sum += float(o.loss) * int(o.n_tokens)
            tokens += int(o.n_tokens)
    assert results["captions"]["tokens"] == tokens > 0
    assert results["captions"]["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    loader = build_loader(loaded.cfg, "captions", enc, train=False)
    loss, n = source_loss(loaded, loader, "cpu", max_batches=1)
    assert 0 < n < tokens

    # Two ranks, the other with a single micro-batch: this one stops after its first too (a sharded model's
    # forward is collective; one more on one rank alone would wait forever). The fake reduce plays the
    # other rank: it adds its "I have a micro-batch" (1, then 0) and its (loss sum, tokens) of zero.
    other_has = iter([1.0, 0.0])
    asked = []

    def reduce(t):
        if t.numel() == 1:
            asked.append(float(t))
            return t + next(other_has)
        return t

    one = source_loss(loaded, build_loader(loaded.cfg, "captions", enc, train=False), "cpu", max_batches=1)
    assert source_loss(loaded, build_loader(loaded.cfg, "captions", enc, train=False), "cpu",
                       reduce=reduce, ranks=2) == one
    assert asked == [1.0, 1.0]  # asked before each micro-batch; this rank still had one the second time


def test_eval_cli_without_held_out_shards_says_so(tmp_path, tiny_tokenizer, capsys):
    from kosmos.eval import main

    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, tiny_model())
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ckpt)])
    assert e.value.code == 2 and "no held-out shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--shards", "pictures=x.tar"])
    assert "SOURCE=PATTERN" in capsys.readouterr().err


def test_a_checkpoints_own_pipe_shards_are_not_run_unless_allowed(tmp_path, tiny_tokenizer, capsys):
    """A checkpoint from elsewhere whose config names `pipe:COMMAND` eval shards: `kosmos.eval loss` with the
    checkpoint's defaults refuses to run the command (before: run through the shell, no question asked);
    --allow-checkpoint-commands runs it, and a pipe: typed with --shards is the user's own."""
    from kosmos.eval import main

    texts = text_shards(tmp_path / "txt", 1, 5)
    marker = tmp_path / "ran"
    model = tiny_model(f"data.text.eval_shards=['pipe:touch {marker}; cat {texts[0]}']")
    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, model)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ckpt)])
    assert e.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert "runs a shell command" in err and "--allow-checkpoint-commands" in err and "--shards text=" in err
    assert main(["--checkpoint", str(ckpt), "--allow-checkpoint-commands"]) == 0 and marker.exists()
    marker.unlink()
    assert main(["--checkpoint", str(ckpt), "--shards", f"text=pipe:touch {marker}; cat {texts[0]}"]) == 0
    assert marker.exists()


def test_eval_loss_shows_a_bar_per_source_on_a_terminal(tmp_path, tiny_tokenizer, monkeypatch):
    """`kosmos-eval loss` reads held-out shards for as long as they last: a bar per source on stderr when it
    is a terminal (kosmos.progress), none with --no-progress; the results on stdout are the same."""
    import sys

    from kosmos.eval import main
    from tests.helpers import Terminal

    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, tiny_model("data.text.micro_batch_size=2"))
    texts = text_shards(tmp_path / "txt", 1, 40)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["--checkpoint", str(ckpt), "--shards", f"text={texts[0]}", "--max-batches", "2"]) == 0
    assert "text: 100%" in term.getvalue() and "2/2 [" in term.getvalue()
    term.seek(0), term.truncate()
    assert main(["--checkpoint", str(ckpt), "--shards", f"text={texts[0]}", "--no-progress"]) == 0
    assert term.getvalue() == ""
