"""Loss and perplexity of a model on held-out shards, per source.

Used by the trainer's periodic evaluation (with a cross-rank sum) and by `python -m kosmos.eval`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Iterable

import torch

from kosmos.data.packing import to_device  # noqa: F401 - the micro-batch as model arguments
from kosmos.model import evaluating
from kosmos.progress import bar as progress_bar
from kosmos.sequence import SequenceEncoder


@torch.no_grad()
def source_loss(model, batches: Iterable[dict], device, max_batches: int | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                ranks: int = 1) -> tuple[float, int]:
    """(mean loss per target token, target tokens) over at most `max_batches` micro-batches. `reduce` sums
    the (loss sum, tokens) pair over ranks when several processes evaluate shares of the same shards. With
    `ranks` > 1 (and `reduce`), the ranks first agree, before each micro-batch, that every one of them has
    one: all run the same number of forward passes, which a sharded model (FSDP2: each forward gathers
    weights from every rank) needs, or the ranks with more held-out data would wait forever."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
    it = iter(batches)
    with evaluating(model):
        for i in itertools.count():
            if max_batches is not None and i == max_batches:
                break
            batch = next(it, None)
            if ranks > 1 and reduce is not None:
                have = reduce(torch.tensor([float(batch is not None)], dtype=torch.float64, device=device))
                if int(have.item()) < ranks:  # some rank has no micro-batch left: all stop here
                    break
            if batch is None:
                break
            out = model(**to_device(batch, device))
            total += torch.stack([out.loss.double() * out.n_tokens, out.n_tokens.double()])
    if reduce is not None:
        total = reduce(total)
    loss_sum, tokens = total.tolist()  # sync point
    return loss_sum / max(tokens, 1), int(tokens)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def main(argv: list[str] | None = None) -> int:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.eval", "loss"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint directory, or a run's output dir (its newest checkpoint)")
    ap.add_argument("--shards", action="append", default=[], metavar="SOURCE=PATTERN",
                    help="held-out shards of a source of the checkpoint's config, by name (text, captions, "
                         "interleaved or a data.sources.<name>); repeat for several. Default: each "
                         "source's eval_shards in the checkpoint's config")
    ap.add_argument("--allow-checkpoint-commands", action="store_true",
                    help="run the `pipe:COMMAND` shards that the checkpoint's own config names (refused by "
                         "default: a checkpoint from elsewhere must not run shell commands)")
    ap.add_argument("--max-batches", type=int, default=None, help="micro-batches per source (default: all)")
    ap.add_argument("--output", help="also write the results to this JSON file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (shown on a terminal only) over each source's micro-batches")
    ap.add_argument("overrides", nargs="*",
                    help="config overrides key=value, e.g. data.captions.micro_batch_size=4")
    args = ap.parse_args(argv)

    from kosmos.data import build_loader
    from kosmos.data.remote import PIPE
    from kosmos.weights import load_model

    model = load_model(args.checkpoint, overrides=args.overrides, device=args.device)
    cfg = model.cfg
    named = cfg.data.named_sources()
    given: dict[str, list[str]] = {}
    for item in args.shards:
        name, sep, pattern = item.partition("=")
        if not sep or name not in named:
            ap.error(f"--shards {item!r}: expected SOURCE=PATTERN with SOURCE one of {', '.join(named)}")
        given.setdefault(name, []).append(pattern)
    for name, patterns in given.items():  # given shards replace the config's for that source
        named[name].eval_shards = patterns
    sources = [n for n, src in named.items() if src.eval_shards]
    for name in sources:  # what the user typed may run commands; what the checkpoint brought may not
        commands = [p for p in named[name].eval_shards if str(p).strip().startswith(PIPE)]
        if name not in given and commands and not args.allow_checkpoint_commands:
            ap.exit(2, f"error: {cfg.data.key(name)}.eval_shards in the checkpoint's config runs a shell "
                       f"command ({commands[0][:80]}); a checkpoint may not run commands: give the shards "
                       f"with --shards {name}=PATTERN, or allow them with --allow-checkpoint-commands\n")
    if not sources:
        ap.error("no held-out shards: pass --shards SOURCE=PATTERN (the checkpoint's config names none)")
    encoder = SequenceEncoder.from_config(cfg)
    results = {}
    for name in sources:
        try:
            loader = build_loader(cfg, name, encoder, train=False)
        except FileNotFoundError as e:
            ap.exit(2, f"error: {cfg.data.key(name)}.eval_shards: {e}\n")
        limited = itertools.islice(loader, args.max_batches)  # the bar then counts the last one too
        with progress_bar(limited, desc=name, unit=" batches", total=args.max_batches,
                          enabled=not args.no_progress) as batches:
            loss, tokens = source_loss(model, batches, args.device)
        results[name] = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens}
        print(f"{name:<12} loss {loss:.4f}  ppl {perplexity(loss):10.3f}  ({tokens:,} target tokens)",
              flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0
