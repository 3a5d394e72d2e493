import json
from collections import Counter

import pytest
import torch

from kosmos.config import load_config
from kosmos.data import SourceDataset, SourceLoader, plan
from kosmos.data.packing import Packer
from kosmos.data.samples import encode_sample
from kosmos.data.shards import expand_shards
from kosmos.model import IGNORE_INDEX
from kosmos.sequence import SequenceEncoder
from tests.helpers import caption_shards, interleaved_shards, jpeg, text_shards, write_tar

NL = 4  # image slots per image in these tests


def make_ds(kind, shards, tok, **kw):
    args = dict(max_len=64, micro_batch_size=2, seed=0, shuffle_buffer=0, infinite=False)
    args.update(kw)
    return SourceDataset(kind, shards, SequenceEncoder(tok, NL, 32), **args)


def consume(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def count_samples(paths):
    import tarfile

    keys = set()
    for p in paths:
        with tarfile.open(p) as t:
            keys |= {(p, m.name.split(".")[0]) for m in t.getmembers()}
    return len(keys)


@pytest.mark.parametrize("n_shards", [5, 2])  # more shards than the 4 workers, and fewer
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, tiny_tokenizer, n_shards):
    shards = text_shards(tmp_path, n_shards, 7)
    seen = Counter()
    for rank in range(2):
        ds = make_ds("text", shards, tiny_tokenizer, rank=rank, world_size=2, num_workers=2)
        for b in SourceLoader(ds):
            seen.update(map(tuple, b["sample_positions"]))
    assert max(seen.values()) == 1
    assert len(seen) == n_shards * 7 == count_samples(shards)


def _check_rows(batch, tok):
    ids, mask, labels, pad = batch["input_ids"], batch["image_mask"], batch["labels"], batch["padding_mask"]
    n_images = 0
    for r in range(ids.shape[0]):
        row = ids[r].tolist()
        i = 0
        while i < len(row):
            if row[i] == tok.image_id and not pad[r, i]:
                assert mask[r, i + 1 : i + 1 + NL].all() and row[i + 1 + NL] == tok.image_end_id, "cut image span"
                n_images += 1
                i += NL + 2
            else:
                assert not mask[r, i], "an image slot outside a span"
                i += 1
        # padding only at the tail
        n_real = int((~pad[r]).sum())
        assert not pad[r, :n_real].any() and pad[r, n_real:].all()
    assert int(mask.sum()) == n_images * NL
    assert batch["images"].shape[0] == n_images
    # labels: -100 exactly at image slots and padding
    assert torch.equal(labels == IGNORE_INDEX, mask | pad)
    assert torch.equal(labels[~(mask | pad)], ids[~(mask | pad)])


@pytest.mark.parametrize("kind", ["captions", "interleaved"])
def test_rows_keep_image_spans_whole(tmp_path, tiny_tokenizer, kind):
    make = caption_shards if kind == "captions" else interleaved_shards
    shards = make(tmp_path, 2, 6)
    batches = consume(SourceLoader(make_ds(kind, shards, tiny_tokenizer)))
    assert batches
    for b in batches:
        _check_rows(b, tiny_tokenizer)
        assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 32, 32)


def test_long_document_continues_across_rows_intact(tmp_path, tiny_tokenizer):
    shards = interleaved_shards(tmp_path, 1, 1, max_images=4, words=(30, 40))
    ds = make_ds("interleaved", shards, tiny_tokenizer, micro_batch_size=1)
    batches = consume(SourceLoader(ds))
    assert len(batches) >= 3, "the document should span several rows"
    ids = torch.cat([b["input_ids"][0][~b["padding_mask"][0]] for b in batches]).tolist()
    images = torch.cat([b["images"] for b in batches])
    from kosmos.data.shards import read_shard

    raw = next(read_shard(shards[0], Counter()))[1]
    ref = encode_sample("interleaved", raw, (0, 0), SequenceEncoder(tiny_tokenizer, NL, 32))
    assert ids == ref.ids
    assert torch.equal(images, torch.stack(ref.images))
    for b in batches:
        _check_rows(b, tiny_tokenizer)


def test_packer_fills_rows_with_whole_samples():
    from kosmos.data.samples import Encoded

    p = Packer(max_len=10, num_latents=2, pad_id=0)
    items = [Encoded(pos=(0, i), ids=[1] * n, image_mask=[False] * n) for i, n in enumerate([4, 5, 3, 8, 2])]
    rows = [r for r, _ in p.pack(items)]
    assert [r.n_real for r in rows] == [9, 3, 10]  # 4+5 | 3 (8 does not fit) | 8+2
    assert [r.starts for r in rows] == [[(0, 0), (0, 1)], [(0, 2)], [(0, 3), (0, 4)]]


def _resume_setup(tmp_path, tok):
    shards = interleaved_shards(tmp_path / "d", 3, 5, words=(5, 30))
    return shards, dict(infinite=True, shuffle_buffer=4, num_workers=2, micro_batch_size=2)


def test_resume_consumes_the_same_samples_as_an_uninterrupted_run(tmp_path, tiny_tokenizer):
    shards, kw = _resume_setup(tmp_path, tiny_tokenizer)
    full = consume(SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw)), 17)

    first = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw))
    head = consume(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert any(st["carry"] for st in state["workers"].values()), "the test should resume mid-document"
    resumed = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw))
    resumed.load_state_dict(state)
    tail = consume(resumed, 10)
    for a, b in zip(full, head + tail, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["images"], b["images"])
        assert a["sample_positions"] == b["sample_positions"]
    # over several epochs (3 shards x 5 samples, 17 micro-batches of 2 rows)
    assert max(st["epoch"] for st in resumed.state_dict()["workers"].values()) >= 1


def test_resume_refuses_another_layout(tmp_path, tiny_tokenizer):
    shards, kw = _resume_setup(tmp_path, tiny_tokenizer)
    first = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw))
    consume(first, 2)
    other = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **{**kw, "num_workers": 1}))
    with pytest.raises(ValueError, match="same layout"):
        other.load_state_dict(first.state_dict())


def test_bad_samples_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    good = [{"__key__": f"g{i}", "jpg": jpeg(i), "txt": b"a red circle"} for i in range(3)]
    bad = [
        {"__key__": "b0", "jpg": b"not a jpeg at all", "txt": b"a caption"},
        {"__key__": "b1", "jpg": jpeg(9)},
        {"__key__": "b2", "jpg": jpeg(8), "txt": b"\xff\xfe bad utf8 \xff"},
        {"__key__": "b3", "jpg": jpeg(7), "txt": b"   "},
        {"__key__": "b4", "txt": b"no image"},
        {"__key__": "b5", "jpg": b"", "txt": b"zero bytes"},
    ]
    path = write_tar(tmp_path / "cap-000000.tar", good[:2] + bad + good[2:])
    loader = SourceLoader(make_ds("captions", [str(path)], tiny_tokenizer))
    batches = consume(loader)
    assert sum(len(b["sample_positions"]) for b in batches) == 3
    assert dict(loader.skipped()) == {"bad_image": 1, "missing_caption": 1, "not_utf8": 1, "empty_caption": 1,
                                      "missing_image": 1, "empty_image": 1}
    # a cut tar: what precedes the cut is read, the cut is counted, nothing crashes
    full = write_tar(tmp_path / "full.tar", good).read_bytes()
    for cut, reason in [(700, "broken_shard"), (3000, "truncated_shard"), (5000, "broken_shard")]:
        broken = tmp_path / f"cut{cut}.tar"
        broken.write_bytes(full[:cut])
        loader = SourceLoader(make_ds("captions", [str(broken)], tiny_tokenizer))
        n = sum(len(b["sample_positions"]) for b in consume(loader))
        assert loader.skipped()[reason] == 1, (cut, loader.skipped())
        assert n < 3


def test_expand_shards(tmp_path):
    paths = text_shards(tmp_path, 3, 1)
    assert expand_shards([str(tmp_path)]) == sorted(paths)
    assert expand_shards([str(tmp_path / "text-{000000..000001}.tar")]) == sorted(paths)[:2]
    assert expand_shards([str(tmp_path / "*.tar"), paths[0]]) == sorted(paths)
    with pytest.raises(FileNotFoundError, match="nothing"):
        expand_shards([str(tmp_path / "nothing-*.tar")])


def test_mixture_plan_scales_the_paper_budgets():
    cfg = load_config(None, ["data.text.shards=[x]", "data.captions.shards=[x]", "data.interleaved.shards=[x]",
                             "data.text.micro_batch_size=8", "data.captions.micro_batch_size=8",
                             "data.interleaved.micro_batch_size=8"])
    p = plan(cfg, world_size=8)
    # 0.5M / (2048 * 8 * 8) = 3.8 -> 4 micro-batches; 0.2M -> 1.5 -> 2
    assert {k: v.micro_batches for k, v in p.items()} == {"text": 4, "captions": 4, "interleaved": 2}
    assert p["text"].tokens_per_step == 4 * 8 * 2048 * 8
    cfg = load_config(None, ["data.captions.shards=[x]"])
    assert list(plan(cfg)) == ["captions"]  # any source may be left out


def test_packer_numbers_documents_per_row():
    # doc_ids: 1, 2, ... per piece of document in a row, 0 at padding; a document continued from the
    # previous row is that row's first piece; collate passes them on as (B, L)
    from kosmos.data.packing import collate
    from kosmos.data.samples import Encoded

    p = Packer(max_len=10, num_latents=2, pad_id=0)
    items = [Encoded(pos=(0, i), ids=[1] * n, image_mask=[False] * n) for i, n in enumerate([4, 5, 3, 14, 2])]
    rows = [r for r, _ in p.pack(items)]
    assert [r.doc_ids for r in rows] == [
        [1] * 4 + [2] * 5 + [0],
        [1] * 3 + [2] * 7,  # 14 is longer than a row: it fills this one up and goes on
        [1] * 7 + [2] * 2 + [0],
    ]
    batch = collate(rows, image_size=8)
    assert batch["doc_ids"].shape == batch["input_ids"].shape
    assert torch.equal(batch["doc_ids"] == 0, batch["padding_mask"])
    from kosmos.eval.loss import to_device  # the trainer's and evaluation's way to the model

    assert torch.equal(to_device(batch, "cpu")["doc_ids"], batch["doc_ids"])
