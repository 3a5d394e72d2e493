"""Helpers shared by the tests: tiny models, tiny shards made in the test, planted bad inputs.

    tiny models     configs/tiny.yaml with overrides, randomly initialised, CPU, fp32
    tiny shards     webdataset shards of the three source kinds, in the training format
    converter I/O   real photos from assets/images, planted bad files, reading converter output back
    multi-process   `launch`/`start`: N processes under `accelerate launch` (or torchrun), a hard timeout that
                    kills the launcher and all below it; `alive_with_marker`: what of a run is still running

Imported as `from tests.helpers import ...` (the repository root is on pytest's path).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from kosmos.config import Config, load_config
from kosmos.model import Kosmos

# ----------------------------------------------------------------------------- tiny models

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def loaded_vision(cfg):
    """A vision tower of `cfg` (a VisionConfig) with the CLIP weights its `vision.pretrained` names
    (building one reads nothing: kosmos.weights.load_clip_weights does)."""
    from kosmos.vision import VisionEncoder
    from kosmos.weights import load_clip_weights

    enc = VisionEncoder(cfg)
    load_clip_weights(enc)
    return enc


def log_lines(path: str | Path) -> list[str]:
    """The lines of a run's train.log as they were printed: without the time each starts with
    (`kosmos.metrics.stamp`); a line without one is a failure."""
    import re

    from kosmos.metrics import LOG_STAMP

    lines = Path(path).read_text().splitlines()
    bare = [re.sub(f"^{LOG_STAMP}", "", x) for x in lines]
    missing = [x for x, b in zip(lines, bare, strict=True) if x == b]
    assert not missing, f"{path}: lines without a time: {missing[:3]}"
    return bare


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def tiny_model(*overrides: str, seed: int = 0) -> Kosmos:
    torch.manual_seed(seed)
    return Kosmos(tiny_config(*overrides))


def random_images(model: Kosmos, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = model.vision.image_size
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)  # the model normalises pixels


def make_row(model: Kosmos, text_before: int, n_images: int, text_after: int, seed: int = 0,
             image_id: int = 4, image_end_id: int = 5, pad_id: int = 0):
    """ids and image mask for `<s> text <image> slots </image> ... text`: a single row (1, L)."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.decoder.vocab_size
    n = model.num_latents

    def text(k):
        return torch.randint(10, V, (k,), generator=g).tolist()

    ids, mask = [2] + text(text_before), [False] * (1 + text_before)
    for _ in range(n_images):
        ids += [image_id] + [pad_id] * n + [image_end_id]
        mask += [False] + [True] * n + [False]
    ids += text(text_after)
    mask += [False] * text_after
    return torch.tensor([ids]), torch.tensor([mask])


class MixtureStandIn:
    """A mixture stand-in for checkpoint tests: just a data position, kept under the mixture's own entry of
    the data state (a valid data state without a source: kosmos.data.state)."""

    def __init__(self, pos: int = 0):
        self.pos = pos

    def state_dict(self) -> dict:
        return {"_mixture": {"steps": self.pos}}

    def load_state_dict(self, sd: dict) -> None:
        self.pos = sd["_mixture"]["steps"]


def checkpoint_dir(run: Path, tokenizer_dir: Path, model: Kosmos, step: int = 7) -> Path:
    """A checkpoint as the trainer writes it, for inference: weights, the resolved config, the tokenizer."""
    import shutil

    from safetensors.torch import save_model

    from kosmos.config import save_config

    ckpt = run / "checkpoints" / f"step_{step:08d}"
    (ckpt / "tokenizer").mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    save_config(model.cfg, ckpt / "config.yaml")
    (ckpt / "trainer_state.json").write_text("{}")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, ckpt / "tokenizer" / f.name)
    return ckpt


# ----------------------------------------------------------------------------- tiny shards

WORDS = "a red blue green small large circle square triangle on the left right top bottom of image".split()


def jpeg(seed: int, size: int = 40) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(im).ellipse((5, 5, 25, 25), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """samples: {"__key__": key, ext: bytes, ...} each."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _make_shards(root: Path, name: str, n_shards: int, per_shard: int, seed: int, sample) -> list[str]:
    """`n_shards` tars `root/NAME-000000.tar`, ... of `per_shard` samples each, sample i of shard s being
    `sample(rng, s, i)` (one RNG seeded with `seed`, drawn in that order)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    return [str(write_tar(root / f"{name}-{s:06d}.tar", [sample(rng, s, i) for i in range(per_shard)]))
            for s in range(n_shards)]


def text_shards(root: Path, n_shards: int, per_shard: int, words=(3, 30), seed: int = 0) -> list[str]:
    def sample(rng, s, i):
        return {"__key__": f"t{s:02d}_{i:03d}", "txt": sentence(rng, rng.randint(*words)).encode()}

    return _make_shards(root, "text", n_shards, per_shard, seed, sample)


def instruction_shards(root, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Text shards as `kosmos.data_tools.text --format instructions` writes them: the templated text in
    KEY.txt, the prompt's length in KEY.json."""
    from kosmos.data_tools.text import render_instruction

    def sample(rng, s, i):
        text, n = render_instruction(sentence(rng, rng.randint(2, 8)), sentence(rng, rng.randint(0, 4)),
                                     sentence(rng, rng.randint(1, 6)))
        return {"__key__": f"i{s:02d}_{i:03d}", "txt": text.encode(),
                "json": json.dumps({"prompt_chars": n, "style": "flat"}).encode()}

    return _make_shards(root, "inst", n_shards, per_shard, seed, sample)


def easy_text_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """Text that a model learns at once: one word, repeated."""
    root.mkdir(parents=True, exist_ok=True)
    doc = b" ".join([b"yes"] * 40)
    return [str(write_tar(root / f"easy-{s:06d}.tar", [{"__key__": f"e{s}_{i}", "txt": doc}
                                                        for i in range(per_shard)])) for s in range(n_shards)]


def caption_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0,
                   captions: int = 1) -> list[str]:
    """Caption shards; with ``captions`` > 1, sample i has 1 + i % captions distinct captions, COCO-style:
    the first in KEY.txt, all of them in KEY.json's "captions"."""
    def sample(rng, s, i):
        caps = [sentence(rng, rng.randint(3, 12)) + (f" {j}" if captions > 1 else "")
                for j in range(1 + i % captions)]
        out = {"__key__": f"c{s:02d}_{i:03d}", "jpg": jpeg(s * 1000 + i), "txt": caps[0].encode()}
        if captions > 1:
            out["json"] = json.dumps({"captions": caps}).encode()
        return out

    return _make_shards(root, "cap", n_shards, per_shard, seed, sample)


def interleaved_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0, max_images: int = 3,
                       words=(5, 40)) -> list[str]:
    def sample(rng, s, i):
        out: dict = {"__key__": f"d{s:02d}_{i:03d}"}
        segments = []
        for j in range(rng.randint(1, max_images)):
            segments.append({"text": sentence(rng, rng.randint(*words))})
            segments.append({"image": f"img{j}.jpg"})
            out[f"img{j}.jpg"] = jpeg(rng.randrange(10**6))
        segments.append({"text": sentence(rng, rng.randint(*words))})
        out["json"] = json.dumps({"segments": segments, "meta": {}}).encode()
        return out

    return _make_shards(root, "doc", n_shards, per_shard, seed, sample)


# ----------------------------------------------------------------------------- converter inputs and outputs

ASSETS = ROOT / "assets" / "images"
PHOTOS = sorted(ASSETS.glob("*.jpg"))


@lru_cache(maxsize=64)
def photo(i: int, size: tuple[int, int] = (120, 96), fmt: str = "JPEG") -> bytes:
    """A real photo from assets/images (index ``i`` modulo 16) resized to ``size``, encoded as ``fmt``."""
    with Image.open(PHOTOS[i % len(PHOTOS)]) as im:
        im = im.convert("RGB").resize(size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


class Terminal(io.StringIO):
    """A stand-in for sys.stderr that says it is a terminal: progress (kosmos.progress, tqdm) shows there."""

    def isatty(self) -> bool:
        return True


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def single_colour(size: tuple[int, int] = (100, 100)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REASONS = ("corrupt_image", "empty_image", "decompression_bomb", "truncated_image", "image_too_small",
               "single_colour_image")


def bad_image(reason: str) -> bytes:
    """Bytes that ``normalize_image`` rejects with ``reason``."""
    if reason == "corrupt_image":
        return b"this is not an image at all" * 10
    if reason == "empty_image":
        return b""
    if reason == "decompression_bomb":
        return bomb_png()
    if reason == "truncated_image":
        data = photo(3, (200, 160))
        return data[: len(data) // 2]
    if reason == "image_too_small":
        return photo(4, (40, 30))
    if reason == "single_colour_image":
        return single_colour()
    raise KeyError(reason)


def shard_paths(folder: Path) -> list[str]:
    return [str(p) for p in sorted(Path(folder).glob("*.tar"))]


def read_wds(folder: Path) -> list[dict]:
    """All samples via plain ``webdataset.WebDataset`` (no shuffling), in shard order."""
    import webdataset as wds

    return list(wds.WebDataset(shard_paths(folder), shardshuffle=False, empty_check=False))


def read_tar(folder: Path) -> dict[str, dict[str, bytes]]:
    """All samples via ``tarfile``: {key: {ext: bytes}}; asserts deterministic member headers."""
    out: dict[str, dict[str, bytes]] = {}
    for p in shard_paths(folder):
        with tarfile.open(p) as tar:
            for m in tar:
                assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.isfile(), m
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in shard_paths(folder)}


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


# ----------------------------------------------------------------------------- a loopback HTTP server


class ShardServer:
    """A loopback HTTP server over a folder, started in a thread by a test (`with ShardServer(root) as s`);
    `s.url("ok/x.tar")`. The first part of the path says how it answers:

        ok/NAME        the file, with HTTP range requests
        norange/NAME   the file, ignoring range requests (always 200 and the whole body)
        missing/NAME   404
        stall/NAME     headers and the first 100 bytes, then nothing until the server stops
        cut/NAME       the full Content-Length, but only the first half of the body, then the connection
                       closes
        flaky/NAME     the first request of each file like cut/, the next ones like ok/
        trickle/NAME   the file, a byte every 20 ms (50 bytes/s) until done or the server stops

    `requests` lists (path, Range header or None) of every request. While `down` is set, every request is
    answered 500 (the store is down)."""

    def __init__(self, root: Path):
        import http.server
        import threading

        self.root, self.requests, self.stop = Path(root), [], threading.Event()
        self.down = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                mode, _, name = self.path.lstrip("/").partition("/")
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                path = server.root / name
                if server.down:
                    self.send_error(500)
                    return
                if mode == "missing" or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if mode == "flaky":
                    mode = "cut" if sum(p == self.path for p, _ in server.requests) == 1 else "ok"
                start = int(rng.split("=")[1].split("-")[0]) if rng and mode == "ok" else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                if mode == "stall":
                    self.wfile.write(data[:100])
                    self.wfile.flush()
                    server.stop.wait(30)
                    return
                if mode == "trickle":
                    for i in range(start, len(data)):
                        if server.stop.wait(0.02):
                            return
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                    return
                self.wfile.write(data[start:] if mode != "cut" else data[: len(data) // 2])
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ----------------------------------------------------------------------------- a full disk


class SmallDisk:
    """A folder where writes fail for want of room, as on a full disk, until `room()` (`with SmallDisk(path,
    size) as disk`). Where this process may mount one (root), a tmpfs of `size` bytes: writes fail with
    ENOSPC ("No space left on device"), as on a full disk. Elsewhere a simulation: RLIMIT_FSIZE of `size`
    bytes on this process, SIGXFSZ ignored, so that writing any file past `size` bytes (in the folder or not)
    fails with EFBIG ("File too large"); keep the block short. `kind` says which: "tmpfs" or "rlimit"."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size, self.kind = Path(folder), size, None
        self._limits = self._handler = None

    def __enter__(self) -> SmallDisk:
        import os
        import resource
        import signal
        import subprocess

        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                                                 str(self.folder)], capture_output=True).returncode == 0:
            self.kind = "tmpfs"
        else:
            self.kind = "rlimit"
            self._handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            self._limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, self._limits[1]))
        return self

    def room(self) -> None:
        """Room again: the tmpfs grows to 1 GB (its pages are only taken as written), or the limit goes."""
        import resource
        import signal
        import subprocess

        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=1g", str(self.folder)], check=True)
        elif self._limits is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limits)
            signal.signal(signal.SIGXFSZ, self._handler)
            self._limits = None

    def __exit__(self, *exc) -> None:
        import subprocess

        self.room()
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.folder)], check=True)


# ----------------------------------------------------------------------------- multi-process runs

MARKER = "KOSMOS_TEST_MARKER"
"""An environment variable that a test sets to a unique value for a run: every process of the run (ranks,
DataLoader workers, the commands they start) inherits it, so `alive_with_marker` finds what is left."""


DDP_DEBUG = "INFO"
"""TORCH_DISTRIBUTED_DEBUG for runs that wrap the model in DistributedDataParallel (the trainer without
train.sharding=fsdp2): torch 2.14.1 segfaults in DDP's constructor (Logger.set_construction_data_and_log)
when the process group is DETAIL's ProcessGroupWrapper (gloo, CPU; a 10-line DDP script does it every time
here), so those runs have the project's own check only (KOSMOS_CHECK_COLLECTIVES, kosmos.distributed)."""


STANDALONE = {"PET_STANDALONE": "1"}
"""The environment that makes a launch pick no port: torchrun's `--standalone` (torchrun reads each of its
flags from PET_<FLAG> as well, and `accelerate launch`, which runs torchrun in its own process, has no flag
for this one). The launcher's rendezvous store then binds port 0 itself and the ranks share that store
(MASTER_PORT is its port), so no port is picked, released and bound again later, which another test or the
soak could take in between ("address already in use")."""


def launch_env(debug: str = "DETAIL", **extra: str) -> dict:
    """The environment of a multi-process test: CPU (gloo), one thread per process, this checkout on
    PYTHONPATH, the stacks of a crashed rank (PYTHONFAULTHANDLER), KOSMOS_CHECK_COLLECTIVES=1 (every
    reduction of kosmos.distributed compared over the ranks first), no port picked in advance (STANDALONE)
    and TORCH_DISTRIBUTED_DEBUG=`debug`: with DETAIL, gloo checks that all ranks call the same collective
    with the same shapes and reports a mismatch instead of hanging (not with DDP: DDP_DEBUG). `extra`
    overrides any of them."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1", "KOSMOS_CHECK_COLLECTIVES": "1", "TORCH_DISTRIBUTED_DEBUG": debug,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **STANDALONE,
            **extra}


def launch_cmd(nproc: int, script, args=(), launcher: str = "accelerate") -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N SCRIPT ARGS` (CPU, no mixed precision), or with
    launcher="torchrun" `python -m torch.distributed.run --standalone --nproc_per_node N ...`. `script`: a
    path, or a list such as ["-m", "kosmos.eval", "run"]. Run it in launch_env() (STANDALONE): the rendezvous
    binds port 0 itself (`--main_process_port 0` only keeps accelerate from checking its default 29500)."""
    script = [str(script)] if isinstance(script, (str, Path)) else list(script)
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                *script, *map(str, args)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0", *script, *map(str, args)]


def start(nproc: int, script, args=(), *, env: dict | None = None, debug: str = "DETAIL", cwd=ROOT,
          launcher: str = "accelerate", **popen) -> subprocess.Popen:
    """The launcher started in a session of its own, for `finish` or `kill_group`. `env`: added to
    launch_env(debug)."""
    return subprocess.Popen(launch_cmd(nproc, script, args, launcher), cwd=cwd,
                            env=launch_env(debug, **(env or {})), start_new_session=True, **popen)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every process below the launcher: torchrun (under
    `accelerate launch` too) starts each rank in a session of its own, out of the launcher's group, and a
    rank's workers run `pipe:` commands in sessions of their own. All are found before any is killed (the
    children of a killed process are orphaned, out of reach)."""
    from kosmos.watchdog import descendants

    below = descendants(proc.pid)
    for kill in [lambda: os.killpg(proc.pid, signal.SIGKILL)] + [lambda p=p: os.kill(p, signal.SIGKILL)
                                                                 for p in below]:
        try:
            kill()
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float, output=lambda: "") -> int:
    """The launcher's exit status; if it has not ended within `timeout` seconds, it and every process below it
    are killed (kill_group) and the test fails with `output()` (the output so far)."""
    import pytest

    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.wait()
        pytest.fail(f"{' '.join(map(str, proc.args[:8]))} ... did not end within {timeout:g} s: it and all "
                    f"below it were killed. Output so far:\n{output()[-4000:]}")
    finally:
        if proc.poll() is None:  # an exception in the test (KeyboardInterrupt): nothing left running
            kill_group(proc)


def launch(nproc: int, script, args=(), timeout: float = 300, *, check: bool = True, **kw) -> \
        subprocess.CompletedProcess:
    """Run `script` on `nproc` processes (start) to the end, its output captured; past `timeout` seconds it
    and every process below it are killed and the test fails with the output so far. `check`: the test fails
    unless it exits 0."""
    import tempfile

    import pytest

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        def output() -> str:
            out.seek(0)
            err.seek(0)
            return out.read() + err.read()

        proc = start(nproc, script, args, stdout=out, stderr=err, text=True, **kw)
        code = finish(proc, timeout, output)
        out.seek(0)
        err.seek(0)
        res = subprocess.CompletedProcess(proc.args, code, out.read(), err.read())
    if check and code != 0:
        pytest.fail(f"exit status {code}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to its first `keep` fraction, as a copy or a write cut short leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def process_gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie nobody reaps counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); [] once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def loader_workers(pid: int | None = None) -> list[int]:
    """The live DataLoader worker processes of process `pid` (default: this one), from /proc (Linux).
    kosmos.data starts them from a forkserver (a child of `pid` whose command line names
    multiprocessing.forkserver), so they are that server's children: what a test checks of the workers
    (their pids, signals, parents), found as a user would find them, not through the loader's internals."""
    from kosmos.watchdog import descendants

    pid = os.getpid() if pid is None else pid
    below = [(p, _stat(p)) for p in descendants(pid)]
    below = [(p, st) for p, st in below if st and st[0] != "Z"]

    def cmdline(p: int) -> bytes:
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    servers = {p for p, st in below if int(st[1]) == pid and b"forkserver" in cmdline(p)}
    return [p for p, st in below if int(st[1]) in servers]


def alive_with_marker(marker: str) -> list[int]:
    """Pids of the live processes (zombies have no environment left to read) whose environment has
    KOSMOS_TEST_MARKER=`marker`."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:  # gone, or not ours
                continue
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL what is left of a run (alive_with_marker): a failed test leaves nothing running."""
    for pid in alive_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def source_dataset(kind: str, shards: list[str], encoder, *, micro_batch_size: int, num_workers: int = 0,
                   shuffle_buffer: int = 1000, max_tokens: int = 0, loss: str = "all",
                   caption_choice: str = "random", **dataset_args):
    """A SourceDataset built directly, the source's settings given by keyword (`num_workers`: the source's
    `workers`, none unless given) as a `data.<name>` entry would give them; `dataset_args` (max_len, seed,
    infinite, rank, world_size, ...) go to SourceDataset as they are."""
    from kosmos.config import SourceConfig
    from kosmos.data.stream import SourceDataset

    source = SourceConfig(kind=kind, micro_batch_size=micro_batch_size, workers=num_workers,
                          shuffle_buffer=shuffle_buffer, max_tokens=max_tokens, loss=loss,
                          caption_choice=caption_choice)
    return SourceDataset(source, shards, encoder, **dataset_args)


def blocked_signals(queue) -> None:
    """A multiprocessing target: put the signals this process was born blocking (tests of the data workers'
    forkserver)."""
    import signal

    queue.put(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
