"""The tar reader against a corpus of damaged shards: never wrong bytes, never an uncounted loss.

Intact tars of known samples (pax, GNU and ustar headers, long names, members of 0, 1, 511, 512 and 513
bytes; plain, gzip in one stream and in several, bzip2, xz) are damaged the ways shards get damaged: cut at
every block boundary and at random bytes, a byte of a header changed, four bytes of a compressed file
changed. For every damaged copy, read from a file and from a stream that cannot seek:

* every member given has the original's bytes under the original's key and field;
* a sample given as whole (`TarSample.whole`) has all of the original's members; the whole samples come in
  the original order, each once;
* a sample lost or not whole is counted (``broken_shard`` or ``truncated_shard``), and nothing else is.

A plain tar has no checksum over its data, so a changed data byte of a plain tar is not in the corpus (no
reader can see it); its headers are checksummed, compressed data is checked by the decompressor.

CI runs a few hundred cases (seeded, the same every run); ``KOSMOS_TAR_DAMAGE_CASES=N`` runs N (the
counts are printed with ``-s``)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import random
import tarfile
from collections import Counter

import pytest

from kosmos.data.format import iter_tar

CASES = int(os.environ.get("KOSMOS_TAR_DAMAGE_CASES", "400"))
SIZES = (0, 1, 100, 511, 512, 513, 1500, 3000)
DAMAGE = {"broken_shard", "truncated_shard"}


def _samples(rng: random.Random, n: int) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for i in range(n):
        key = f"s{i:03d}" if i % 4 else ("d" * 70 + "/" + "e" * 40 + f"/s{i:03d}")  # prefix, long names
        fields = {"txt": rng.randbytes(rng.choice(SIZES)), "json": b'{"i": %d}' % i}
        if i % 3 == 0:
            fields["jpg"] = rng.randbytes(rng.choice(SIZES))
        if i % 5 == 1:
            fields["img0.jpg"] = rng.randbytes(rng.choice(SIZES))
        out[key] = fields
    return out


def _tar(samples: dict[str, dict[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key, fields in samples.items():
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _header_blocks(plain: bytes) -> list[int]:
    """Offsets of the tar's header blocks (members' and extended headers'), and of its end blocks."""
    out, pos = [], 0
    while pos + 512 <= len(plain) and plain[pos:pos + 512] != bytes(512):
        size = int(plain[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
        out.append(pos)
        pos += 512 + -(-size // 512) * 512
    return out + [pos, pos + 512]


def _corpus(cases: int, seed: int = 0):
    """``(what, damaged bytes, samples)``, ``cases`` of them, the same for a seed."""
    rng = random.Random(seed)
    originals = []
    for k in range(3):
        samples = _samples(rng, 10 + 3 * k)
        for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"),
                          (tarfile.USTAR_FORMAT, "ustar")):
            if fmt == tarfile.USTAR_FORMAT and k:
                continue
            plain = _tar(samples, fmt)
            originals.append((name, "plain", plain, samples))
        plain = _tar(samples, tarfile.PAX_FORMAT)
        cuts = sorted(rng.sample(range(1, len(plain)), 3))
        pieces = [plain[a:b] for a, b in zip([0, *cuts], [*cuts, len(plain)], strict=True)]
        originals += [
            ("gzip", "compressed", gzip.compress(plain, mtime=0), samples),
            ("gzip-multi", "compressed", b"".join(gzip.compress(p, mtime=0) for p in pieces), samples),
            ("bzip2", "compressed", bz2.compress(plain), samples),
            ("xz", "compressed", lzma.compress(plain), samples),
        ]
    made = 0
    while made < cases:
        for name, kind, data, samples in originals:
            if made >= cases:
                return
            made += 1
            damage = rng.random()
            if damage < 0.5:  # cut: at a block boundary (plain) or anywhere
                if kind == "plain" and rng.random() < 0.6:
                    at = 512 * rng.randrange(0, len(data) // 512)
                else:
                    at = rng.randrange(0, len(data))
                yield f"{name} cut at {at} of {len(data)}", data[:at], samples
            elif kind == "plain":  # a changed header byte
                block = rng.choice(_header_blocks(data))
                at = block + rng.randrange(512)
                bad = bytearray(data)
                bad[at] ^= rng.randrange(1, 256)
                yield f"{name} header byte {at} changed", bytes(bad), samples
            else:  # four changed bytes (anywhere: header, data, check, length)
                at = rng.randrange(0, len(data) - 3)
                bad = bytearray(data)
                for i in range(at, at + 4):
                    bad[i] ^= rng.randrange(1, 256)
                yield f"{name} bytes {at}..{at + 3} of {len(data)} changed", bytes(bad), samples


class _Stream(io.RawIOBase):
    def __init__(self, data: bytes):
        self.f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.f.readinto(b)


def check_damaged(data: bytes, samples: dict[str, dict[str, bytes]],
                  stream: bool = False) -> tuple[int, Counter]:
    """Read a damaged copy; assert the module docstring's promises. Returns (samples lost or not whole,
    counts)."""
    skipped: Counter = Counter()
    got = list(iter_tar(_Stream(data) if stream else io.BytesIO(data), skipped))
    for s in got:
        assert s.key in samples, f"a sample {s.key!r} that the tar never had"
        for field, value in s.files.items():
            assert value == samples[s.key].get(field), f"{s.key}.{field}: wrong bytes"
        if s.whole:
            missing = set(samples[s.key]) - set(s.files)
            assert not missing, f"{s.key} given as whole without {missing}"
    whole = [s.key for s in got if s.whole]
    order = list(samples)
    assert len(set(whole)) == len(whole), "a sample given twice"
    assert sorted(whole, key=order.index) == whole, "samples out of order"
    lost = len(samples) - len(whole)
    assert set(skipped) <= DAMAGE, f"unexpected counts {dict(skipped)}"
    assert not lost or skipped, f"{lost} samples lost uncounted"
    return lost, skipped


def test_damaged_tars_never_give_wrong_bytes_nor_lose_samples_uncounted():
    seen: Counter = Counter()
    for i, (what, data, samples) in enumerate(_corpus(CASES)):
        try:
            lost, skipped = check_damaged(data, samples, stream=i % 2 == 1)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {what}: {e}") from None
        kind = what.split(" ", 1)[0]
        seen[(kind, "lost, counted" if lost else ("counted, none lost" if skipped else "read whole"))] += 1
        seen[("all", "samples lost (counted)")] += lost
    print(f"\n{CASES} damaged tars:", dict(sorted(seen.items())))
    assert sum(n for (k, what), n in seen.items() if k != "all") == CASES


def test_the_intact_originals_read_whole():
    """The corpus's originals, undamaged: every sample whole, nothing counted (the check is not vacuous)."""
    rng = random.Random(1)
    samples = _samples(rng, 12)
    plain = _tar(samples, tarfile.PAX_FORMAT)
    for data in (plain, _tar(samples, tarfile.GNU_FORMAT), gzip.compress(plain), bz2.compress(plain),
                 lzma.compress(plain), gzip.compress(plain[:5000]) + gzip.compress(plain[5000:])):
        for stream in (False, True):
            assert check_damaged(data, samples, stream) == (0, Counter())


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_a_compressed_tar_with_a_wrong_check_gives_no_sample_of_the_damaged_stream(compress):
    """A corrupt compressed stream: the decompressor gives wrong bytes before the check that rejects them
    (gzip's CRC-32 comes at the very end), so nothing of that stream is used, and the shard counts as
    broken. tarfile's streaming mode (what webdataset reads with) never checks gzip's CRC."""
    samples = _samples(random.Random(2), 6)
    good = compress(_tar(samples, tarfile.PAX_FORMAT))
    if compress is gzip.compress:
        bad = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]  # the CRC-32 in the trailer
    else:
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x10
        bad = bytes(bad)
    lost, skipped = check_damaged(bad, samples)
    assert lost == len(samples) and skipped == {"broken_shard": 1}
    cut = check_damaged(good[:-3], samples)  # cut inside the trailer: all the tar's bytes, unchecked
    assert cut == (len(samples), Counter(broken_shard=1))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_a_member_that_inflates_hugely_comes_in_pieces_and_whole(compress):
    """A few kB of compressed input that inflate to megabytes (zeros) are decompressed in pieces of at most
    `kosmos.data.format._OUT` bytes (a bomb is not inflated in one call), and the bytes come out right."""
    samples = {"a": {"bin": bytes(3 << 20) + random.Random(3).randbytes(5000), "txt": b"x"},
               "b": {"txt": b"y"}}
    data = compress(_tar(samples, tarfile.PAX_FORMAT))
    assert len(data) < 100_000
    from kosmos.data.format import _OUT, _inflate

    sizes = [len(chunk) for chunk, _ in _inflate(io.BytesIO(data))]
    assert max(sizes) <= _OUT < sum(sizes)
    for stream in (False, True):
        assert check_damaged(data, samples, stream) == (0, Counter())
    assert check_damaged(data[:-20], samples)[1] == {"broken_shard": 1}
