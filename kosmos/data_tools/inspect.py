"""Show the first samples of a shard folder (or one shard), or what training will see of a config's data.

    python -m kosmos.data_tools.inspect shards/coco -n 3
    python -m kosmos.data_tools.inspect 'https://host/shards/cap-{000000..000009}.tar' -n 3
    python -m kosmos.data_tools.inspect --packed configs/tiny.yaml data.text.shards=[my/text] -n 2 --out seen/

Remote shards (URLs, `pipe:COMMAND`; see `kosmos.data.remote`) are streamed, and only as far as shown.

`--packed CONFIG [overrides]` runs the training data pipeline of the config (the overrides as
`kosmos-train` takes them) as rank 0 of one process: the mixture plan as the training log prints it
(`kosmos.training.describe_mixture`), then the first `-n` packed rows of each source (its first
micro-batches, as training reads them: shuffled, packed, truncated), decoded, one line per row: text with its
special tokens, each image's slots as `[image K: N slots -> FILE]`, a document boundary as `||`, text without
loss (an instruction's prompt with `loss: response`) in `{no loss: ...}` and the padding counted. The images,
as the model gets them (resized and cropped, before normalisation), are written to `--out` as
`SOURCE/rowR-imageK.png` (the FILE above).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from kosmos.data.format import is_image_field, iter_tar
from kosmos.data.remote import is_remote, open_shard, shard_name
from kosmos.data.shards import expand_shards
from kosmos.errors import command_name
from kosmos.untrusted import ImageError, load_json, open_image


def _image_desc(data: bytes) -> str:
    try:
        with open_image(data) as img:  # the header only
            return f"{img.format} {img.width}x{img.height} {img.mode}, {len(data)} bytes"
    except ImageError as e:
        return f"undecodable ({e.reason})"


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(key: str, files: dict[str, bytes], width: int = 100) -> str:
    """A few readable lines about one sample."""
    lines = [f"== {key}"]
    doc = None
    for ext, data in sorted(files.items()):
        last = ext.rsplit(".", 1)[-1]
        if is_image_field(ext):
            lines.append(f"  .{ext}: {_image_desc(data)}")
        elif last == "txt":
            lines.append(f"  .{ext}: {_short(data.decode('utf-8', 'replace'), width)}")
        elif last == "json":
            try:
                obj = load_json(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                lines.append(f"  .{ext}: bad JSON, {len(data)} bytes")
                continue
            if isinstance(obj, dict) and "segments" in obj:
                doc = obj
                meta = json.dumps(obj.get("meta", {}), ensure_ascii=False)
                lines.append(f"  .{ext}: meta {_short(meta, width)}")
            else:
                lines.append(f"  .{ext}: {_short(json.dumps(obj, ensure_ascii=False), width)}")
        else:
            lines.append(f"  .{ext}: {len(data)} bytes")
    if doc is not None:
        for seg in doc.get("segments", []):
            if "image" in seg:
                lines.append(f"    [image {seg['image']}]")
            else:
                lines.append(f"    {_short(str(seg.get('text', '')), width)}")
    return "\n".join(lines)


def describe_row(tok, batch: dict, r: int, num_latents: int, image_names: list[str]) -> str:
    """Packed row `r` of a collated micro-batch (`kosmos.data.packing.collate`) as readable lines: a header
    (tokens, images, documents, tokens with loss), then its text decoded with the special tokens, image slots,
    document boundaries, text without loss and padding marked. `image_names[k]`: what to call the row's k-th
    image. A newline of the text shows as `\\n`: one line per row."""
    from kosmos.sequence import IGNORE_INDEX

    ids = batch["input_ids"][r].tolist()
    image = batch["image_mask"][r].tolist()
    pad = batch["padding_mask"][r].tolist()
    labels = batch["labels"][r].tolist()
    docs = batch["doc_ids"][r].tolist()
    n_real = pad.index(True) if True in pad else len(ids)
    parts: list[str] = []
    i, k = 0, 0
    while i < n_real:
        if i and docs[i] != docs[i - 1]:
            parts.append(" || ")
        j = i
        if image[i]:
            while j < n_real and image[j] and docs[j] == docs[i]:
                j += 1
            name = image_names[k] if k < len(image_names) else "?"
            parts.append(f"[image {k}: {j - i} slots -> {name}]")
            k += 1
        else:
            loss = labels[i] != IGNORE_INDEX
            while j < n_real and not image[j] and docs[j] == docs[i] and (labels[j] != IGNORE_INDEX) == loss:
                j += 1
            text = tok.decode(ids[i:j])
            parts.append(text if loss else f"{{no loss: {text}}}")
        i = j
    n_docs = len({d for d, p in zip(docs, pad, strict=True) if not p})
    head = (f"row {r}: {n_real} tokens ({len(ids) - n_real} padding), {k} image(s) of {num_latents} slots, "
            f"{n_docs} document(s), {sum(x != IGNORE_INDEX for x in labels)} tokens with loss")
    return f"{head}\n    " + "".join(parts).replace("\n", "\\n")  # the whole row: nothing cut


def images_per_row(batch: dict, num_latents: int) -> list[int]:
    """How many of the micro-batch's images (in `batch["images"]`, rows in order) each row holds: its image
    slots over the slots of one image."""
    return [int(m.sum()) // num_latents for m in batch["image_mask"]]


def inspect_packed(config: str, overrides: list[str], rows: int = 2,
                   out: str | Path = "inspect-packed") -> int:
    """`--packed`: the mixture plan and the first `rows` packed rows of each source of `config` (see the
    module docstring); the rows' images written under `out`. Returns the exit status."""
    from types import SimpleNamespace

    from PIL import Image

    from kosmos.config import load_config
    from kosmos.data import build_mixture
    from kosmos.sequence import SequenceEncoder
    from kosmos.training import build_tokenizer, describe_mixture

    cfg = load_config(config, overrides)
    tok = build_tokenizer(cfg)
    encoder = SequenceEncoder.from_config(cfg, tok)
    mixture = build_mixture(cfg, encoder)
    out = Path(out)
    try:
        print(describe_mixture(SimpleNamespace(mixed_precision=cfg.train.mixed_precision), cfg, mixture))
        print(f"images of the rows below, as the model gets them (before normalisation): in {out}/")
        for name, loader in mixture.loaders.items():
            shown = 0
            print(f"\n== {cfg.data.key(name)} ({cfg.data.source(name).kind}): the first {rows} packed row(s) "
                  f"of {cfg.decoder.max_len} tokens")
            while shown < rows:
                batch = next(loader)
                counts = images_per_row(batch, encoder.num_latents)
                first = 0
                for r, n in enumerate(counts):
                    if shown >= rows:
                        break
                    names = []
                    for k in range(n):
                        path = out / name / f"row{shown}-image{k}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        pixels = batch["images"][first + k].permute(1, 2, 0).contiguous().numpy()
                        Image.fromarray(pixels).save(path)  # uint8 (S, S, 3): what the model normalises
                        names.append(path.relative_to(out).as_posix())
                    first += n
                    print(describe_row(tok, batch, r, encoder.num_latents, names).replace(
                        f"row {r}:", f"row {shown}:", 1))
                    shown += 1
    finally:
        mixture.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog=command_name("kosmos.data_tools.inspect"),
                                description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a shard folder or one .tar; or shards by URL (https://, s3://, ...), brace "
                   "pattern, glob or pipe:COMMAND, streamed; with --packed, a training config")
    p.add_argument("overrides", nargs="*", help="with --packed: config overrides key=value, as kosmos-train "
                   "takes them")
    p.add_argument("--packed", action="store_true",
                   help="PATH is a training config: show the mixture plan and the first packed rows of each "
                   "source as training will see them (decoded, image slots marked, images written to --out)")
    p.add_argument("-n", type=int, default=None,
                   help="samples to show (default 3); with --packed, rows per source (default 2)")
    p.add_argument("--out", default="inspect-packed",
                   help="with --packed: folder for the rows' images (default inspect-packed)")
    p.add_argument("--width", type=int, default=100,
                   help="characters of text shown per line (default 100; --packed shows whole rows)")
    a = p.parse_args(argv)
    if a.packed:
        from kosmos.errors import run_cli

        rows = 2 if a.n is None else a.n
        return run_cli(lambda *_: inspect_packed(a.path, a.overrides, rows, a.out))
    if a.overrides:
        p.error(f"unexpected arguments {' '.join(a.overrides)} (config overrides go with --packed)")
    a.n = 3 if a.n is None else a.n
    path = Path(a.path)
    if path.is_file() or path.is_dir() or not (is_remote(a.path) or any(c in a.path for c in "{*?[")):
        shards: list = [path] if path.is_file() else sorted(path.glob("*.tar"))
    else:
        try:
            shards = expand_shards([a.path])
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not shards:
        print(f"error: no .tar shards at {a.path}", file=sys.stderr)
        return 2
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        try:
            m = load_json(manifest.read_text(encoding="utf-8"))
            print(f"{m.get('tool')} ({m.get('kind')}): {json.dumps(m.get('totals'))}")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            print(f"warning: {manifest} does not parse ({e})", file=sys.stderr)
    shown = 0
    for shard in shards:
        broken: Counter = Counter()
        errors: list[str] = []
        read = 0
        try:
            f = open_shard(str(shard))
        except OSError as e:
            print(f"error: {shard}: {e}", file=sys.stderr)
            return 2
        with f:
            for sample in iter_tar(f, broken, errors=errors):
                if shown >= a.n:
                    return 0
                print(f"{shard_name(str(shard))}: " + describe(sample.key, sample.files, a.width))
                shown += 1
                read += 1
        if failed := [r for r in broken if r.startswith("shard_")]:
            print(f"error: {shard}: cannot be read ({failed[0]}) after {read} samples: {'; '.join(errors)}",
                  file=sys.stderr)
            return 2
        if broken["broken_shard"] or (broken["truncated_shard"] and not read):
            print(f"error: {_broken_desc(shard, read, errors)}", file=sys.stderr)
            return 2
    return 0


def _broken_desc(shard: str | Path, read: int, errors: list[str]) -> str:
    """One line on a tar that could not be read (to its end)."""
    if not is_remote(str(shard)) and Path(shard).stat().st_size == 0:
        return f"{shard}: an empty file (0 bytes), not a tar"
    why = "; ".join(errors) or "it ends without the end-of-archive blocks"
    if not read:
        return f"{shard}: not a readable tar ({why})"
    return (f"{shard}: the tar breaks after {read} samples ({why}); "
            "check it with python -m kosmos.data_tools.verify")


if __name__ == "__main__":
    sys.exit(main())
