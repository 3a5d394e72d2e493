import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from kosmos.config import load_config
from kosmos.data import SourceLoader, plan
from kosmos.data.packing import Packer
from kosmos.data.samples import encode_sample
from kosmos.data.shards import expand_shards
from kosmos.model import IGNORE_INDEX
from kosmos.sequence import SequenceEncoder
from tests.helpers import (
    ROOT,
    caption_shards,
    instruction_shards,
    interleaved_shards,
    jpeg,
    source_dataset,
    text_shards,
    write_tar,
)

NL = 4  # image slots per image in these tests


def make_ds(kind, shards, tok, **kw):
    args = dict(max_len=64, micro_batch_size=2, seed=0, shuffle_buffer=0, infinite=False)
    args.update(kw)
    return source_dataset(kind, shards, SequenceEncoder(tok, NL, 32), **args)


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
                assert mask[r, i + 1 : i + 1 + NL].all() and row[i + 1 + NL] == tok.image_end_id, \
                    "cut image span"
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


RESUME_CASES = {  # kind, shards, dataset options, micro-batches before the checkpoint
    "interleaved": ("interleaved", lambda root: interleaved_shards(root, 3, 5, words=(5, 30)), {}, 7),
    "captions-random": ("captions", lambda root: caption_shards(root, 3, 5, captions=3), {}, 7),
    # 8: a worker stops between two captions of one image
    "captions-all": ("captions", lambda root: caption_shards(root, 3, 5, captions=3),
                     {"caption_choice": "all"}, 8),
    "instructions-response": ("text", lambda root: instruction_shards(root, 3, 5), {"loss": "response"}, 7),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_consumes_the_same_samples_as_an_uninterrupted_run(tmp_path, tiny_tokenizer, case):
    kind, make, opts, n_head = RESUME_CASES[case]
    shards = make(tmp_path / "d")
    kw = dict(infinite=True, shuffle_buffer=4, num_workers=2, micro_batch_size=2, **opts)
    full = consume(SourceLoader(make_ds(kind, shards, tiny_tokenizer, **kw)), 17)

    first = SourceLoader(make_ds(kind, shards, tiny_tokenizer, **kw))
    head = consume(first, n_head)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert any(st["carry"] for st in state["streams"].values()), "the test should resume mid-document"
    if case == "captions-all":
        from kosmos.data.format import captions
        from kosmos.data.shards import read_shard

        n_caps = {(s, o): len(captions(raw))
                  for s, p in enumerate(shards) for o, raw in read_shard(p, Counter())}
        order = {s: make_ds(kind, shards, tiny_tokenizer, **kw).stream(int(s))._order(st["epoch"])
                 for s, st in state["streams"].items()}
        assert any(0 < st["sub"] < n_caps[(order[s][st["k"]], st["offset"])]
                   for s, st in state["streams"].items() if st["offset"] >= 0), \
            "the test should resume between two captions of an image"
    resumed = SourceLoader(make_ds(kind, shards, tiny_tokenizer, **kw))
    resumed.load_state_dict(state)
    tail = consume(resumed, 17 - n_head)
    for a, b in zip(full, head + tail, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["images"], b["images"])
        assert a["sample_positions"] == b["sample_positions"]
    # over several epochs (3 shards x 5 samples, 17 micro-batches of 2 rows)
    assert max(st["epoch"] for st in resumed.state_dict()["streams"].values()) >= 1
    if kind == "captions":  # the caption is part of the position, and thus of what resumes
        assert any(len(p) == 3 for b in full for p in b["sample_positions"])


def test_a_checkpoint_from_before_logical_streams_resumes_exactly(tmp_path, tiny_tokenizer):
    """A data position written when each global worker was one stream (`workers`: worker -> its state) is
    read as S = G streams."""
    shards = interleaved_shards(tmp_path / "d", 3, 5, words=(5, 30))
    kw = dict(infinite=True, shuffle_buffer=4, num_workers=2, micro_batch_size=2, streams=2)
    full = consume(SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw)), 9)
    first = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw))
    head = consume(first, 5)
    sd = json.loads(json.dumps(first.state_dict()))
    old = {k: sd[k] for k in ("kind", "world_size", "num_workers", "next_worker")}
    old["workers"] = sd["streams"]
    resumed = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **{**kw, "streams": 0}))
    resumed.load_state_dict(old)
    for a, b in zip(full, head + consume(resumed, 4), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["sample_positions"] == b["sample_positions"]


def test_a_document_whose_head_image_does_not_fit_starts_in_the_next_row_only():
    from kosmos.data.samples import Encoded

    p = Packer(max_len=16, num_latents=4, pad_id=0)  # image span: 6 tokens
    first = Encoded(pos=(0, 0), ids=[1] * 12, image_mask=[False] * 12)
    ids = [1] * 6 + [1] * 14  # an image span first, then text: longer than a row
    second = Encoded(pos=(0, 1), ids=ids, image_mask=[False] * 20, image_starts=[0],
                     images=[torch.zeros(3, 2, 2)])
    rows = [r for r, _ in p.pack([first, second])]
    assert [r.starts for r in rows] == [[(0, 0)], [(0, 1)], []]
    assert [r.n_real for r in rows] == [12, 16, 4]


def _rank_states(loaders):
    """What a checkpoint stores for one source (each rank's state), as every rank of a resume reads it."""
    from kosmos.data.streams import rank_data_state

    per_rank = [json.loads(json.dumps({"src": ld.state_dict()})) for ld in loaders]
    return [rank_data_state(per_rank, r)["src"] for r in range(len(per_rank))]


ELASTIC = {  # (world_size, workers) before -> after the checkpoint; micro-batches per rank before it
    "2 processes -> 1": ((2, 1), (1, 1), 3),
    "1 worker -> 2 workers": ((1, 1), (1, 2), 5),
    "2x2 -> 1x3": ((2, 2), (1, 3), 2),
}


@pytest.mark.parametrize("case", ELASTIC)
@pytest.mark.parametrize("kind", ["interleaved", "captions"])
def test_elastic_resume_consumes_every_sample_of_the_epoch_once(tmp_path, tiny_tokenizer, case, kind):
    """A pass (one epoch) cut by a checkpoint and resumed on another number of processes or workers: its
    logical streams are dealt over the new workers, and the sample positions consumed before and after are
    those of the uninterrupted pass, each once (the order differs: another layout interleaves them
    otherwise)."""
    (ws0, nw0), (ws1, nw1), n_head = ELASTIC[case]
    make = interleaved_shards if kind == "interleaved" else caption_shards
    shards = make(tmp_path / "d", 5, 7, **({"words": (5, 30)} if kind == "interleaved" else {"captions": 3}))
    kw = dict(shuffle_buffer=4, micro_batch_size=2, streams=6, caption_choice="all")

    def loaders(ws, nw):
        return [SourceLoader(make_ds(kind, shards, tiny_tokenizer, rank=r, world_size=ws, num_workers=nw,
                                     **kw)) for r in range(ws)]

    def positions(batches):
        return Counter(tuple(p) for b in batches for p in b["sample_positions"])

    full = sum((positions(consume(ld)) for ld in loaders(ws0, nw0)), Counter())
    assert max(full.values()) == 1 and len(full) >= 5 * 7  # every document, every caption of every image

    first = loaders(ws0, nw0)
    head = sum((positions(consume(ld, n_head)) for ld in first), Counter())
    saved = _rank_states(first)
    carries = [st["carry"] for sd in saved for st in sd["streams"].values() if st["carry"]]
    assert carries and (kind == "captions" or any(c[-1] > 0 for c in carries)), \
        "the test should resume mid-document"
    tail = Counter()
    for r, ld in enumerate(loaders(ws1, nw1)):
        ld.load_state_dict(saved[r] if r < ws0 else saved[0])
        assert "elastic resume" in ld.resume_note
        tail += positions(consume(ld))
    assert not head & tail, "a sample consumed before the checkpoint was consumed again"
    assert head + tail == full


@pytest.mark.parametrize("streams", [3, 7])  # fewer streams than shards (whole shards), more (split shards)
@pytest.mark.parametrize("change", ["added first", "removed", "added and removed"])
def test_a_resume_over_a_changed_shard_folder_keeps_what_matches(tmp_path, tiny_tokenizer, streams, change):
    """Shards added (sorting first: every index moves) or removed between the checkpoint and the resume: the
    positions follow the shards by name, the pass under way goes on over the shards that remain, nothing
    consumed is consumed again, every sample of a remaining shard is consumed once, and no sample of a
    removed or added shard is read in that pass. Before: silently wrong samples (added), or an IndexError
    (removed)."""
    import shutil

    shards = interleaved_shards(tmp_path / "d", 5, 7, words=(5, 30))
    kw = dict(shuffle_buffer=4, micro_batch_size=2, streams=streams)

    def by_name(batches, shard_list):
        return Counter((Path(shard_list[p[0]]).name, *p[1:]) for b in batches for p in b["sample_positions"])

    full = by_name(consume(SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw))), shards)
    first = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **kw))
    head = by_name(consume(first, 4), shards)
    saved = _rank_states([first])[0]
    removed = set()
    if "added" in change:
        for i, extra in enumerate(interleaved_shards(tmp_path / "x", 2, 3, seed=9)):
            shutil.copy(extra, tmp_path / "d" / f"0extra-{i}.tar")  # sorts before doc-*.tar
    if "removed" in change:
        victim = max((n for n, *_ in saved["streams"]["0"]["buffer"]), default=None)
        name = Path(shards[victim if victim is not None else 4]).name
        (tmp_path / "d" / name).unlink()
        removed.add(name)
    now = sorted(str(x) for x in (tmp_path / "d").glob("*.tar"))
    second = SourceLoader(make_ds("interleaved", now, tiny_tokenizer, **kw))
    second.load_state_dict(saved)
    assert "the shard list changed since the checkpoint" in second.resume_note
    tail = by_name(consume(second), now)
    assert not head & tail, "a sample consumed before the checkpoint was consumed again"
    assert not (head + tail) - full, "a sample of an added shard was read in the pass under way"
    assert {k[0] for k in full - (head + tail)} <= removed  # only samples of the removed shard are missing
    assert all(k[0] not in removed for k in tail)


@pytest.mark.parametrize("streams", [0, 6])  # as many streams as shards (whole shards), more (split shards)
@pytest.mark.parametrize("case", ELASTIC)
def test_elastic_resume_in_training_loses_nothing_of_the_epoch(tmp_path, tiny_tokenizer, case, streams):
    """Infinite, shuffled streams cut by a checkpoint and resumed on another layout: within the epoch, every
    sample a stream has read is consumed once, or still waits in its shuffle buffer or as its next
    document."""
    (ws0, nw0), (ws1, nw1), n_head = ELASTIC[case]
    shards = interleaved_shards(tmp_path / "d", 5, 12, words=(5, 30))
    kw = dict(shuffle_buffer=4, micro_batch_size=2, streams=streams, infinite=True)

    def loaders(ws, nw):
        return [SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, rank=r, world_size=ws,
                                     num_workers=nw, **kw)) for r in range(ws)]

    consumed = Counter()
    first = loaders(ws0, nw0)
    for ld in first:
        consumed.update(tuple(p) for b in consume(ld, n_head) for p in b["sample_positions"])
    saved = _rank_states(first)
    final = {}
    for r, ld in enumerate(loaders(ws1, nw1)):
        ld.load_state_dict(saved[r] if r < ws0 else saved[0])
        consumed.update(tuple(p) for b in consume(ld, 5) for p in b["sample_positions"])
        final.update(ld.state_dict()["streams"])
    ds = make_ds("interleaved", shards, tiny_tokenizer, **kw, world_size=max(ws0, ws1), num_workers=3)
    ds.n_streams = saved[0]["n_streams"]
    assert len(final) == ds.n_streams and max(consumed.values()) == 1
    waiting, passed = Counter(), Counter()
    for s, st in final.items():
        assert st["epoch"] == 0, "the test should stay in the first epoch"
        stream = ds.stream(int(s))
        for i, shard in enumerate(stream._order(0)[: st["k"] + 1]):
            passed.update((shard, o) for o in range(12) if (i < st["k"] or o <= st["offset"])
                          and (not stream.split_samples or o % stream.S == stream.s))
        waiting.update(tuple(p) for p in st["buffer"])
        if st["carry"] and st["carry"][-1] == 0:  # the next row starts it
            waiting[tuple(st["carry"][:-1])] += 1
    assert not consumed & waiting
    assert consumed + waiting == passed


def test_a_restored_buffer_larger_than_the_stream_s_drains(tmp_path, tiny_tokenizer):
    """Elastic resume can give a stream a smaller share of its worker's shuffle buffer, or none: what waited
    in the larger one comes out first, none of it left behind."""
    shards = interleaved_shards(tmp_path / "d", 2, 6)
    kw = dict(shuffle_buffer=4, infinite=True, streams=2)
    stream = make_ds("interleaved", shards, tiny_tokenizer, **kw).stream(0)
    it = stream.encoded()
    [next(it) for _ in range(2)]
    st = json.loads(json.dumps(stream.state(None)))
    assert len(st["buffer"]) == 3
    for size in (0, 1):  # no buffer of its own any more: the 3 waiting come out with the next one read
        ds = make_ds("interleaved", shards, tiny_tokenizer, **kw)
        ds.states = {0: st}
        got = [x.pos for _, x in zip(range(4), ds.stream(0, size).encoded(), strict=False)]
        assert {tuple(p) for p in st["buffer"]} <= set(got), size


def test_elastic_resume_on_more_workers_than_streams_splits_them(tmp_path, tiny_tokenizer):
    """Once refused ("3 logical streams, which cannot feed this run's 4 global workers"): the 3 streams are
    split by samples into 6, and the split position is saved and resumed again."""
    shards, kw = _resume_setup(tmp_path, tiny_tokenizer)  # 3 shards: 3 logical streams
    first = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **{**kw, "num_workers": 1}))
    consume(first, 2)
    assert first.state_dict()["n_streams"] == 3
    other = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **{**kw, "num_workers": 4}))
    other.load_state_dict(_rank_states([first])[0])
    assert "3 logical streams split by samples into 6" in other.resume_note
    consume(other, 3)
    sd = json.loads(json.dumps(other.state_dict()))
    assert sd["n_streams"] == 6 and {tuple(st["part"]) for st in sd["streams"].values()} == \
        {(s, 3, j, 2) for s in range(3) for j in range(2)}
    again = SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, **{**kw, "num_workers": 4}))
    again.load_state_dict(sd)  # the same layout: exactly where it was
    assert again.dataset.n_streams == 6 and again.resume_note is None and len(consume(again, 2)) == 2


def test_split_streams_split_again_and_lose_nothing_of_the_epoch(tmp_path, tiny_tokenizer):
    """Infinite, shuffled: 1 x 1 -> 2 processes (1 stream split into 2) -> 1 x 3 workers (2 split into 4).
    Within the epoch every sample a stream has read is consumed once, or waits in its shuffle buffer or as its
    next document."""
    shards = interleaved_shards(tmp_path / "d", 1, 40, words=(5, 30))
    kw = dict(shuffle_buffer=4, micro_batch_size=2, infinite=True)

    def loaders(ws, nw):
        return [SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, rank=r, world_size=ws,
                                     num_workers=nw, **kw)) for r in range(ws)]

    consumed = Counter()
    saved = None
    for (ws, nw), n in (((1, 1), 3), ((2, 1), 2), ((1, 3), 2)):
        now = loaders(ws, nw)
        for r, ld in enumerate(now):
            if saved is not None:
                ld.load_state_dict(saved[r] if r < len(saved) else saved[0])
            consumed.update(tuple(p) for b in consume(ld, n) for p in b["sample_positions"])
        saved = _rank_states(now)
    final = {s: st for sd in saved for s, st in sd["streams"].items()}
    assert saved[0]["n_streams"] == len(final) == 4 and max(consumed.values()) == 1
    assert sorted(tuple(st["part"]) for st in final.values()) == [(0, 1, b, 4) for b in range(4)]
    waiting, passed = Counter(), Counter()
    for st in final.values():
        assert st["epoch"] == 0, "the test should stay in the first epoch"
        passed.update((0, o) for o in range(40) if o <= st["offset"] and o % 4 == st["part"][2])
        waiting.update(tuple(p) for p in st["buffer"])
        if st["carry"] and st["carry"][-1] == 0:  # the next row starts it
            waiting[tuple(st["carry"][:-1])] += 1
    assert not consumed & waiting
    assert consumed + waiting == passed


SCALE_UP = {  # shards of the source; (world_size, workers) after the checkpoint (before it: 1 x 1)
    "1 shard -> 2 processes": (1, (2, 1)),
    "1 shard -> 3 workers": (1, (1, 3)),
    "3 shards -> 2 processes": (3, (2, 1)),
    "3 shards -> 1 x 3 workers": (3, (1, 3)),
    "3 shards -> 2 x 2 workers": (3, (2, 2)),
}


@pytest.mark.parametrize("case", SCALE_UP)
@pytest.mark.parametrize("kind", ["interleaved", "captions"])
def test_scaling_up_consumes_every_sample_of_the_epoch_once(tmp_path, tiny_tokenizer, case, kind):
    """A pass on 1 process x 1 worker cut by a checkpoint and resumed on more global workers than the source
    has streams (one per shard): the streams are split by samples (stream.split_streams), and the samples
    consumed before and after are those of the uninterrupted pass, each once."""
    n_shards, (ws1, nw1) = SCALE_UP[case]
    make = interleaved_shards if kind == "interleaved" else caption_shards
    shards = make(tmp_path / "d", n_shards, 15 if n_shards == 1 else 7,
                  **({"words": (5, 30)} if kind == "interleaved" else {"captions": 3}))
    kw = dict(shuffle_buffer=4, micro_batch_size=2, caption_choice="all")

    def loaders(ws, nw):  # 1 x 1: one stream per shard, as training makes them (the checkpoint sets S after)
        return [SourceLoader(make_ds(kind, shards, tiny_tokenizer, rank=r, world_size=ws, num_workers=nw,
                                     streams=n_shards if ws * nw == 1 else 0, **kw)) for r in range(ws)]

    def positions(batches):
        return Counter(tuple(p) for b in batches for p in b["sample_positions"])

    full = positions(consume(loaders(1, 1)[0]))
    assert max(full.values()) == 1 and len(full) >= 15
    first = loaders(1, 1)
    head = positions(consume(first[0], 3))
    saved = _rank_states(first)
    assert any(st["carry"] or st["buffer"] for st in saved[0]["streams"].values())
    for st in saved[0]["streams"].values():  # as written before streams recorded their part
        del st["part"]
    tail = Counter()
    for ld in loaders(ws1, nw1):
        ld.load_state_dict(saved[0])
        assert "elastic resume" in ld.resume_note
        assert ld.dataset.n_streams >= ws1 * nw1
        tail += positions(consume(ld))
    assert not head & tail, "a sample consumed before the checkpoint was consumed again"
    assert head + tail == full


def test_scaling_up_splits_the_streams_that_no_worker_had_read_yet(tmp_path, tiny_tokenizer):
    """Found by the soak (seed 0): a checkpoint written before every worker had handed over a micro-batch
    holds no state for that worker's streams; scaled up, those streams must be split like the others (their
    part fixed from the first run's layout), or their children's default parts overlap the split ones' samples
    and some samples are read twice, others never."""
    shards = interleaved_shards(tmp_path / "d", 3, 7, words=(5, 30))
    kw = dict(shuffle_buffer=4, micro_batch_size=2)

    def loader(ws, nw, r=0):
        return SourceLoader(make_ds("interleaved", shards, tiny_tokenizer, rank=r, world_size=ws,
                                    num_workers=nw, streams=3 if (ws, nw) == (1, 2) else 0, **kw))

    def positions(batches):
        return Counter(tuple(p) for b in batches for p in b["sample_positions"])

    full = positions(consume(loader(1, 2)))
    first = loader(1, 2)
    head = positions(consume(first, 1))
    first.close()
    saved = _rank_states([first])[0]
    assert len(saved["streams"]) < 3, "the test needs a stream without a state"
    tail = Counter()
    for r in range(2):
        ld = loader(2, 2, r)
        ld.load_state_dict(saved)
        tail += positions(consume(ld))
    assert not head & tail, "a sample consumed before the checkpoint was consumed again"
    assert head + tail == full


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
    # a brace pattern naming shards that are not all there: named, or used with `allow_missing`
    pattern = str(tmp_path / "text-{000001..000004}.tar")
    with pytest.raises(FileNotFoundError, match=r"2 of the 4 shards named by .* do not exist: "
                                                r".*text-000003\.tar, .*text-000004\.tar "
                                                r"\(data\.allow_missing_shards"):
        expand_shards([pattern])
    missing = []
    assert expand_shards([pattern], allow_missing=True, missing=missing) == sorted(paths)[1:]
    assert missing == [str(tmp_path / "text-000003.tar"), str(tmp_path / "text-000004.tar")]
    with pytest.raises(FileNotFoundError, match="no shards found"):  # allowed, but none at all
        expand_shards([str(tmp_path / "text-{000005..000006}.tar")], allow_missing=True)


PAPER = ["data.text.shards=[x]", "data.captions.shards=[x]", "data.interleaved.shards=[x]"]


@pytest.mark.parametrize("world_size", [1, 2, 8, 32, 64])
def test_mixture_plan_keeps_the_paper_ratio_and_total_at_any_world_size(world_size):
    cfg = load_config(ROOT / "configs" / "kosmos1.yaml", PAPER)  # 0.5M/0.5M/0.2M, rows of 2048, 8 per pass
    p = plan(cfg, world_size=world_size)
    assert list(p.sources) == ["text", "captions", "interleaved"]
    assert abs(p.tokens / 1_200_000 - 1) <= 0.05 and p.drift() <= cfg.data.mixture_tolerance
    shares = p.shares()
    for name, target in (("text", 5 / 12), ("captions", 5 / 12), ("interleaved", 2 / 12)):
        assert shares[name] == pytest.approx(target, rel=0.05), (world_size, shares)
        assert p.sources[name].tokens_per_step == p.sources[name].micro_batches * 8 * 2048
    # one slot per rank; together the slots are the step, every rank runs at least one pass
    assert len(p.slots) == world_size
    planned = {n: s.micro_batches for n, s in p.sources.items()}
    assert {n: sum(s[n] for s in p.slots) for n in p.sources} == planned
    lo, hi = p.passes()
    assert 1 <= lo and hi - lo <= 1
    if world_size <= 8:  # an even split is within the tolerance there: no rank waits
        assert lo == hi
    # rotating the slots, every rank reads every source equally over world_size steps
    for r in range(world_size):
        assert {n: sum(p.counts(r, t)[n] for t in range(world_size)) for n in p.sources} == planned


def test_mixture_plan_refuses_drift_beyond_the_tolerance_unless_allowed():
    over = [*PAPER, "data.interleaved.tokens_per_step=8000"]  # half a micro-batch, rounded up: twice it
    with pytest.raises(ValueError, match="data.mixture_tolerance.*data.allow_mixture_drift"):
        plan(load_config(ROOT / "configs" / "kosmos1.yaml", over), world_size=8)
    p = plan(load_config(ROOT / "configs" / "kosmos1.yaml", [*over, "data.allow_mixture_drift=true"]), 8)
    assert p.drift() > 0.05 and p.sources["interleaved"].micro_batches == 1
    cfg = load_config(None, ["data.captions.shards=[x]"])
    assert list(plan(cfg).sources) == ["captions"]  # any source may be left out


def test_mixture_drift_refusal_names_the_source_most_off():
    over = [*PAPER, "data.interleaved.tokens_per_step=8000"]
    with pytest.raises(ValueError, match=r"change data.interleaved.tokens_per_step or "
                                         r"data.interleaved.micro_batch_size \(8,000 tokens budgeted, 16,384 "
                                         r"in micro-batches of 8 x 2048\), or set data.allow_mixture_drift"):
        plan(load_config(ROOT / "configs" / "kosmos1.yaml", over), world_size=8)


def test_mixture_rotates_slots_and_restores_the_rotation_from_its_state():
    from kosmos.data.mixture import Mixture

    class Stream:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            return self.n

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, sd):
            self.n = sd["n"]

    cfg = load_config(None, [*PAPER, "data.text.tokens_per_step=4096", "data.captions.tokens_per_step=2048",
                             "data.interleaved.tokens_per_step=2048", "decoder.max_len=256"])
    p = plan(cfg, world_size=2)  # 2 + 1 + 1 micro-batches: 2 passes per rank
    assert p.balanced and p.passes() == (2, 2)

    def mixture(rank):
        return Mixture({n: Stream() for n in p.sources}, p, rank)

    m0, m1 = mixture(0), mixture(1)
    steps = [([n for n, _ in m0.step()], [n for n, _ in m1.step()]) for _ in range(4)]
    assert steps[0] == (["text", "captions"], ["text", "interleaved"]) and steps[1] == steps[0][::-1]
    assert steps[2] == steps[0] and steps[3] == steps[1]
    sd = m0.state_dict()
    again = mixture(0)
    again.load_state_dict(sd)
    assert again.resume_note is None and again.steps == 4
    assert [n for n, _ in again.step()] == [n for n, _ in m0.step()]  # the same slot, the same data
    old = {n: v for n, v in sd.items() if n != Mixture.STATE_KEY}  # a checkpoint from before the plan
    again = mixture(0)
    again.load_state_dict(old)
    assert "predates" in again.resume_note and again.loaders["text"].n == m0.loaders["text"].n - 1


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
    from kosmos.data.packing import to_device  # the trainer's and evaluation's way to the model

    assert torch.equal(to_device(batch, "cpu")["doc_ids"], batch["doc_ids"])


# ------------------------------------------------------------------------ instruction loss, every caption


def _instruction_batches(shards, tok, loss):
    return consume(SourceLoader(make_ds("text", shards, tok, loss=loss, max_len=256, micro_batch_size=1)))


def test_response_loss_masks_exactly_the_prompt_tokens(tmp_path, tiny_tokenizer):
    from kosmos.data.shards import read_shard

    shards = instruction_shards(tmp_path, 2, 6)
    raw = {(s, o): r for s, p in enumerate(shards) for o, r in read_shard(p, Counter())}
    every = _instruction_batches(shards, tiny_tokenizer, "all")
    response = _instruction_batches(shards, tiny_tokenizer, "response")
    assert len(every) == len(response) > 1
    n_prompt_tokens = 0
    for a, b in zip(every, response, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["sample_positions"] == b["sample_positions"]
        pad = a["padding_mask"][0]
        # all: the whole text carries loss, nothing extra is masked
        assert torch.equal(a["labels"][0] == IGNORE_INDEX, pad)
        # response: -100 exactly over each sample's <s> and the tokens that decode to its prompt
        want = pad.clone()
        ids = a["input_ids"][0].tolist()
        doc = a["doc_ids"][0].tolist()
        assert max(doc) == len(a["sample_positions"]), "every sample whole in its row"
        for d, pos in enumerate(a["sample_positions"], start=1):
            start = doc.index(d)
            text = raw[tuple(pos)]["txt"].decode()
            prompt = text[: json.loads(raw[tuple(pos)]["json"])["prompt_chars"]]
            end = start + 1
            while tiny_tokenizer.decode(ids[start + 1 : end]) != prompt:
                end += 1
                assert end - start < 200, "the prompt is not a token prefix of the sample"
            assert ids[start] == tiny_tokenizer.bos_id and prompt.startswith("Instruction: ")
            assert tiny_tokenizer.decode([i for i, dd in zip(ids, doc, strict=True) if dd == d][1:-1]) == text
            want[start:end] = True
            n_prompt_tokens += end - start
        assert torch.equal(b["labels"][0] == IGNORE_INDEX, want)
        assert torch.equal(b["labels"][0][~want], a["input_ids"][0][~want])
    assert n_prompt_tokens > 12
    # plain text shards: the same with either setting
    plain = text_shards(tmp_path / "plain", 1, 5)
    for x, y in zip(_instruction_batches(plain, tiny_tokenizer, "all"),
                    _instruction_batches(plain, tiny_tokenizer, "response"), strict=True):
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["labels"] == IGNORE_INDEX,
                                                                     x["padding_mask"])


def test_a_bad_prompt_length_is_skipped_and_counted(tmp_path, tiny_tokenizer):
    samples = [{"__key__": f"k{i}", "txt": b"Instruction: x\nOutput: y",
                "json": json.dumps({"prompt_chars": n}).encode()} for i, n in enumerate([23, 99, -1, "3", 0])]
    loader = SourceLoader(make_ds("text", [str(write_tar(tmp_path / "t.tar", samples))], tiny_tokenizer,
                                  loss="response"))
    # 23 (the prompt of these 24 chars) and 0 (none)
    assert sum(len(b["sample_positions"]) for b in consume(loader)) == 2
    assert loader.skipped() == {"bad_prompt_chars": 3}


def test_loss_and_caption_choice_config_keys(tmp_path, tiny_tokenizer):
    from kosmos.config import ConfigError
    from kosmos.data import build_loader

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert (cfg.data.text.loss, cfg.data.captions.caption_choice) == ("all", "random")
    text, caps = instruction_shards(tmp_path / "t", 1, 2), caption_shards(tmp_path / "c", 1, 2, captions=2)
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["data.text.loss=response", "data.captions.caption_choice=all",
                       f"data.text.shards=[{text[0]}]", f"data.captions.shards=[{caps[0]}]"])
    assert (cfg.data.text.loss, cfg.data.captions.caption_choice) == ("response", "all")
    enc = SequenceEncoder(tiny_tokenizer, NL, 32)  # the training pipeline gets them
    assert build_loader(cfg, "text", enc).dataset.loss == "response"
    assert build_loader(cfg, "captions", enc).dataset.caption_choice == "all"
    with pytest.raises(ConfigError, match="data.text.loss.*all, response"):
        load_config(None, ["data.text.loss=prompt"])
    with pytest.raises(ConfigError, match="data.captions.caption_choice.*first, random, all"):
        load_config(None, ["data.captions.caption_choice=every"])


def _caption_visits(shards, tok, n_batches=None, **kw):
    """(shard, offset) -> the caption index of each visit, in order."""
    args = dict(infinite=n_batches is not None, micro_batch_size=1)
    visits: dict = {}
    for b in consume(SourceLoader(make_ds("captions", shards, tok, **{**args, **kw})), n_batches):
        for pos in map(tuple, b["sample_positions"]):
            visits.setdefault(pos[:2], []).append(pos[2] if len(pos) == 3 else None)
    return visits


def test_random_caption_choice_covers_every_caption_reproducibly(tmp_path, tiny_tokenizer):
    from kosmos.data.samples import encode_sample
    from kosmos.data.shards import read_shard

    shards = caption_shards(tmp_path, 2, 6, captions=4)  # 1, 2, 3, 4, 1, 2 captions per image
    visits = _caption_visits(shards, tiny_tokenizer, 120)  # 12 images, about 3 per row: ~30 epochs
    assert len(visits) == 12
    for (shard, offset), picks in visits.items():
        n = 1 + offset % 4
        assert len(picks) >= 20
        if n == 1:
            assert set(picks) == {None}  # a single caption keeps the plain position
        else:
            assert set(picks) == set(range(n)), (shard, offset, picks)  # every caption, over the epochs
    assert visits == _caption_visits(shards, tiny_tokenizer, 120)  # the same seed: the same captions
    assert visits != _caption_visits(shards, tiny_tokenizer, 120, seed=1)
    # the caption of a position is the one encoded
    enc = SequenceEncoder(tiny_tokenizer, NL, 32)
    raw = dict(read_shard(shards[0], Counter()))[3]  # 4 captions
    caps = json.loads(raw["json"])["captions"]
    for c in range(4):
        ids = encode_sample("captions", raw, (0, 3, c), enc).ids
        assert tiny_tokenizer.decode(ids[NL + 3 : -1]) == caps[c]


def test_all_captions_are_samples_and_first_keeps_the_first(tmp_path, tiny_tokenizer):
    shards = caption_shards(tmp_path, 2, 6, captions=3)
    for workers in (0, 2):
        visits = _caption_visits(shards, tiny_tokenizer, caption_choice="all", num_workers=workers)
        assert visits == {(s, o): [None] if o % 3 == 0 else list(range(1 + o % 3))
                          for s in range(2) for o in range(6)}
    first = _caption_visits(shards, tiny_tokenizer, caption_choice="first")
    assert first == {(s, o): [None] for s in range(2) for o in range(6)}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_shard_among_good_ones_is_counted_and_the_training_stream_goes_on(tmp_path, tiny_tokenizer,
                                                                                   workers):
    """6 shards, one of them broken, S = 6 logical streams: the stream that gets the broken shard in an epoch
    finds nothing in its pass, but the worker's other streams yield, so it only moves on (the rules that stop
    a source are per worker): the source keeps producing batches, counting the bad shard once per epoch."""
    shards = text_shards(tmp_path / "d", 6, 4, words=(20, 40))
    with open(shards[2], "r+b") as f:
        f.write(b"\x00garbage" * 64)
    ds = make_ds("text", shards, tiny_tokenizer, infinite=True, num_workers=workers, micro_batch_size=1,
                 shuffle_buffer=3)
    assert ds.n_streams == 6
    loader = SourceLoader(ds)
    batches = consume(loader, 60)
    assert len(batches) == 60
    seen = Counter(p[0] for b in batches for p in b["sample_positions"])
    assert 2 not in seen and set(seen) == {0, 1, 3, 4, 5}
    bad = loader.skipped()["broken_shard"]
    epochs = max(st["epoch"] for st in loader.states.values())
    assert 1 <= bad <= epochs + 2  # read once per epoch (of the stream that gets it), not in a tight loop
    # the skipping is deterministic and part of the state: resumed anywhere, the same batches follow
    waited = False
    for cut in (5, 17, 29, 43):
        first = SourceLoader(make_ds("text", shards, tiny_tokenizer, infinite=True, num_workers=workers,
                                     micro_batch_size=1, shuffle_buffer=3))
        head = consume(first, cut)
        first.close()
        state = json.loads(json.dumps(first.state_dict()))
        waited |= any(st["wait"] for st in state["streams"].values())
        resumed = SourceLoader(make_ds("text", shards, tiny_tokenizer, infinite=True, num_workers=workers,
                                       micro_batch_size=1, shuffle_buffer=3))
        resumed.load_state_dict(state)
        tail = consume(resumed, 60 - cut)
        resumed.close()
        assert [b["sample_positions"] for b in head + tail] == [b["sample_positions"] for b in batches]
    assert waited, "the test should resume while a stream waits"


class _GcProbe(torch.utils.data.IterableDataset):
    """Collects garbage in the worker, then yields the worker's pid."""

    def __iter__(self):
        import gc
        import os

        gc.collect()
        yield os.getpid()


def test_loader_workers_never_finalise_the_main_process_garbage(tmp_path):
    """Garbage of the main process (a dropped torch.distributed process group, say: its destructor joins
    threads a forked child does not have, which hung or aborted a worker in CI) is not collected inside a
    DataLoader worker: the workers are forked with the collector's objects frozen."""
    import gc
    import os

    from kosmos.data.workers import start_workers

    log = tmp_path / "finalised"

    class Cycle:
        def __del__(self):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    gc.disable()  # the cycle must still be there when the worker forks (a worker's gc.collect runs anyway)
    try:
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        del a, b
        it = start_workers(torch.utils.data.DataLoader(_GcProbe(), batch_size=None, num_workers=1))
    finally:
        gc.enable()
    worker = next(iter(it))
    del it
    gc.collect()
    pids = log.read_text().split() if log.exists() else []
    assert str(worker) not in pids, "a worker finalised the main process's garbage"
    assert pids == [str(os.getpid())] * 2  # the main process did


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_start_and_stop_many_times_while_threads_come_and_go(tmp_path, tiny_tokenizer):
    """Forking a process that runs other threads can leave the child waiting forever on a lock one of them
    held (a 2-process run hung so). Two sources' workers are started and stopped 10 times while threads are
    created and ended all the time: none may hang, and none is forked from this process (which runs
    threads), only from a process that runs one thread."""
    import os
    import subprocess

    shards = text_shards(tmp_path, 4, 10)
    code = "\n".join([
        "import os, threading",
        "from kosmos.config import SourceConfig",
        "from kosmos.data.stream import SourceDataset, SourceLoader",
        "from kosmos.sequence import SequenceEncoder",
        "from kosmos.tokenizer import KosmosTokenizer",
        "from tests.helpers import loader_workers",
        f"enc = SequenceEncoder(KosmosTokenizer.from_dir({str(tiny_tokenizer.path)!r}), 4, 32)",
        "def churn():",
        "    while True:",
        "        ts = [threading.Thread(target=sum, args=([1],)) for _ in range(4)]",
        "        [t.start() for t in ts]",
        "        [t.join() for t in ts]",
        "for _ in range(3): threading.Thread(target=churn, daemon=True).start()",
        "for i in range(10):",
        "    source = SourceConfig(kind='text', micro_batch_size=2, workers=2)",
        f"    loaders = [SourceLoader(SourceDataset(source, {shards!r}, enc, max_len=64, seed=s))",
        "               for s in range(2)]",
        "    for loader in loaders:",
        "        next(loader)",
        "    workers = loader_workers()",  # the forkserver's children: none forked from this process
        "    assert len(workers) == 4, workers",
        "    for p in workers:",
        "        ppid = int(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1])",
        "        threads = len(os.listdir(f'/proc/{ppid}/task'))",
        "        assert ppid != os.getpid() and threads == 1, f'forked by {ppid} with {threads} threads'",
        "    for loader in loaders:",
        "        loader.close()",
        "print('ok')", ""])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
