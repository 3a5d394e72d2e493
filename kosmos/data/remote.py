"""Shards from anywhere: a shard spec is a local path, a URL, or `pipe:COMMAND`.

    /data/cap-000000.tar                    a local file (as before)
    https://host/shards/cap-000000.tar      HTTP(S), read with the standard library (no extra package)
    s3://bucket/cap-000000.tar, gs://...    any other fsspec protocol: needs fsspec (installed with torch)
                                            and the protocol's package (`pip install s3fs`, `gcsfs`, ...)
    pipe:aws s3 cp s3://b/x.tar -           a command whose standard output is the shard (webdataset's
                                            convention), run by the shell

Brace patterns expand over all of them (`https://host/cap-{000000..000099}.tar`). Globs and directories
are listed through fsspec where the protocol can list (s3, gs, memory, ...); plain HTTP cannot list a
directory, so HTTP shards are named one by one or by a brace pattern.

Reads stream: a shard is read front to back once, never downloaded whole first. Every read has a timeout
(`ReadOptions.timeout`: seconds without a byte, connecting included) and a floor on its speed
(`ReadOptions.min_speed`, averaged over each `timeout` seconds, so that a server trickling a byte at a time
cannot hold a worker for hours); a transient failure (timeout, a read below the floor,
connection reset, HTTP 5xx or 429, a body cut short, a command that exits non-zero or stalls) is retried
`ReadOptions.retries` times with a doubling wait, resuming at the byte where it stopped (an HTTP range
request; a server that ignores ranges, or a command, is read again from the start and the bytes already
read are skipped). Every error of an fsspec protocol's library (botocore's EndpointConnectionError when S3
goes away, say, which is no OSError) is such a failure too; listing shards at start that fails is a one-line
ValueError naming the spec. A `pipe:` command runs in a session of its own (a signal to the trainer's process
group does not reach it) and dies with the process that started it, even one killed with SIGKILL. A shard
that keeps failing ends with a `ShardError`, whose `reason` the reader counts (`shard_not_found`,
`shard_timeout`, `shard_http_error`, `shard_cut_short`, `shard_command_failed`, `shard_unreadable`) and
whose message names the URL. HTTP 404/410 and other 4xx are not retried.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import http.client
import io
import os
import re
import select
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kosmos.config.paths import PIPE, is_remote, is_url  # noqa: F401 - this module's interface too


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read: timeouts and retries (`data.read_timeout`, `data.read_retries`)."""

    timeout: float = 60.0
    """Seconds a read may wait for a byte (connecting included) before it fails and is retried."""
    retries: int = 3
    """Retries of a failed open or read of one shard, each after a wait of `backoff` seconds, doubling."""
    backoff: float = 1.0
    """The first wait before a retry."""
    give_up: float = 600.0
    """A worker whose shard reads keep failing, one after the other, for this many seconds (their timeouts and
    retries) without a sample in between stops the run (`kosmos.data.retry`)."""
    min_speed: float = 10_000.0
    """Bytes per second a read must average over each window of `timeout` seconds (`data.read_min_speed`); a
    slower one, a server that trickles, fails as a timeout does (0: no floor)."""


DEFAULT = ReadOptions()
"""What a reader given no options uses (the tools: verify, inspect, tokenizer.build, kosmos.eval)."""


class ShardError(OSError):
    """A shard that cannot be read (after its retries): `reason` is the word counted as skipped, the
    message names the shard."""

    def __init__(self, spec: str, reason: str, detail: str):
        super().__init__(f"{spec}: {detail}")
        self.spec, self.reason, self.detail = spec, reason, detail


class _Transient(Exception):
    """A failure worth a retry: (reason, detail)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _oneline(e: BaseException) -> str:
    """`Type: message` on one line (botocore's and aiohttp's messages can span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def shard_name(spec: str) -> str:
    """A short name for messages: the file name of a path or URL, the command of a pipe."""
    spec = str(spec)
    if spec.startswith(PIPE):
        return spec
    return spec.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _import_fsspec(url: str):
    """The fsspec module; a one-line ValueError naming `url` when it is not installed."""
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"{url}: reading {_protocol(url)}:// shards needs fsspec (`pip install fsspec`)") \
            from None
    return fsspec


def _fsspec(url: str):
    """(filesystem, path) for a URL of an fsspec protocol; a one-line error when fsspec or the protocol's
    package is missing."""
    fsspec = _import_fsspec(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise ValueError(f"{url}: {_protocol(url)}:// needs an optional package: {e}") from None
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None


def check_spec(spec: str) -> None:
    """Raise ValueError (one line) for a spec that can never be read: an unknown URL protocol, or one whose
    package is not installed (`s3://` without s3fs). Touches no network."""
    if spec.startswith(PIPE):
        if not spec[len(PIPE):].strip():
            raise ValueError(f"{spec!r}: pipe: needs a command")
        return
    if is_url(spec) and _protocol(spec) not in ("http", "https"):
        fsspec = _import_fsspec(spec)
        try:
            fsspec.get_filesystem_class(_protocol(spec))
        except ImportError as e:
            raise ValueError(f"{spec}: {_protocol(spec)}:// needs an optional package: {e}") from None
        except ValueError:
            raise ValueError(f"{spec}: unknown protocol {_protocol(spec)}://") from None


def list_shards(item: str) -> list[str]:
    """The shards one expanded (brace-free) spec names: itself for a file or URL, the `*.tar` of a directory,
    the matches of a glob; [] when nothing is there (a URL of a listable protocol that does not exist). HTTP
    and pipe: specs are taken as they are (not checked: that would cost a request per shard); an HTTP
    directory or glob is refused, as HTTP cannot list."""
    if item.startswith(PIPE):
        check_spec(item)
        return [item]
    if not is_url(item):
        p = Path(item)
        if p.is_dir():
            return sorted(str(x) for x in p.glob("*.tar"))
        if any(ch in item for ch in "*?["):
            return sorted(_glob.glob(item))
        return [str(p)] if p.is_file() else []
    proto = _protocol(item)
    if proto in ("http", "https"):
        if item.endswith("/") or any(ch in item.split("?", 1)[0] for ch in "*?["):
            raise ValueError(f"{item}: a directory or glob cannot be listed over HTTP; name the shards, "
                             "for example with a brace pattern (https://host/cap-{000000..000099}.tar)")
        return [item]
    check_spec(item)
    fs, path = _fsspec(item)
    prefix = item.split("://", 1)[0] + "://"

    def url(p: str) -> str:
        return fs.unstrip_protocol(p) if hasattr(fs, "unstrip_protocol") else prefix + p.split("://")[-1]

    with _listing(item):
        if any(ch in path for ch in "*?["):
            return sorted(url(p) for p in fs.glob(path))
        if fs.isdir(path):
            return sorted(url(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
        return [item] if fs.exists(path) else []


@contextlib.contextmanager
def _listing(spec: str):
    """Listing `spec` at start: whatever the protocol's library raises (no credentials, an unreachable
    endpoint: botocore's own errors) becomes a one-line ValueError naming the spec."""
    try:
        yield
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - the protocol library's errors are its own types
        raise ValueError(f"{spec}: cannot list it: {_oneline(e)}") from None


def list_many(items: list[str]) -> list[list[str]]:
    """list_shards of each spec of `items` (a brace pattern's expansion). The plain names (no glob, no
    trailing slash) of a listable protocol (s3://, gs://, memory://, ...) that share a folder are looked up in
    one listing of it rather than a request or two each: a pattern over 100,000 shards of a bucket costs a
    hundred list requests (a page holds 1000 keys) instead of 200,000 requests, on every rank. A name the
    listing shows as a folder is listed as list_shards lists it."""
    out: list[list[str] | None] = [None] * len(items)
    folders: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        if (is_url(item) and _protocol(item) not in ("http", "https") and not item.endswith("/")
                and not any(ch in item for ch in "*?[")):
            folders.setdefault(item.rsplit("/", 1)[0], []).append(i)
    for folder, idx in folders.items():
        if len(idx) < 2:  # one name: list_shards' one or two requests cost less than a listing
            continue
        check_spec(items[idx[0]])
        fs, path = _fsspec(folder)
        try:
            with _listing(folder):
                entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        kinds = {str(e["name"]).rstrip("/"): e.get("type") for e in entries}
        for i in idx:
            kind = kinds.get(fs._strip_protocol(items[i]).rstrip("/"))
            out[i] = [] if kind is None else [items[i]] if kind == "file" else None  # None: a folder
    return [got if got is not None else list_shards(item) for got, item in zip(out, items, strict=True)]


# ------------------------------------------------------------------------------------------ opening


def _http(url: str, pos: int, timeout: float) -> tuple[BinaryIO, int | None, int]:
    """(response, total size or None, position it starts at) of a GET from byte `pos`."""
    headers = {"User-Agent": "kosmos-data"}
    if pos:
        headers["Range"] = f"bytes={pos}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in (404, 410):
            raise ShardError(url, "shard_not_found", f"HTTP {e.code} {e.reason}") from None
        if e.code == 429 or e.code >= 500:
            raise _Transient("shard_http_error", f"HTTP {e.code} {e.reason}") from None
        raise ShardError(url, "shard_http_error", f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise _Transient("shard_timeout", f"no answer within {timeout:g}s") from None
        raise _Transient("shard_unreadable", f"{type(reason).__name__}: {reason}") from None
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        start = int(m[1]) if m else pos
        total = int(m[2]) if m and m[2] != "*" else None
        return resp, total, start
    return resp, int(length) if length and length.isdigit() else None, 0


_REAPER = ('while kill -0 "$1" 2>/dev/null && kill -0 -"$2" 2>/dev/null; do sleep 1; done; '
           'kill -KILL -"$2" 2>/dev/null')
"""`sh -c _REAPER reaper OWNER GROUP`: once process OWNER is gone (or the group ended), kill process group
GROUP. A pipe: command runs in a session of its own, out of reach of the signals sent to the trainer's
process group; without this, a worker killed while it read would leave the command (and its children)
running."""


class _Pipe(io.RawIOBase):
    """The standard output of `sh -c COMMAND`, read with a timeout; EOF checks the exit status. The command
    runs in a session of its own and is killed, with its children, when this object closes or when the process
    that opened it dies (_REAPER). Its standard error is read as it comes and only its last STDERR_TAIL bytes
    are kept, for the message of a command that fails: a command that writes without end there (`yes >&2`)
    costs neither disk nor memory."""

    STDERR_TAIL = 4096

    def __init__(self, spec: str, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.tail = b""
        self.proc = subprocess.Popen(spec[len(PIPE):], shell=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        self.reaper = subprocess.Popen(["sh", "-c", _REAPER, "reaper", str(os.getpid()), str(self.proc.pid)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.err: int | None = self.proc.stderr.fileno()

    def readable(self) -> bool:
        return True

    def _read_err(self) -> None:
        data = os.read(self.err, 1 << 16)
        if not data:
            self.err = None  # the command closed its standard error
            return
        self.tail = (self.tail + data)[-self.STDERR_TAIL:]

    def _wait_out(self, deadline: float) -> bool:
        """Wait for the standard output to be readable, reading the standard error meanwhile; False at the
        deadline."""
        while (left := deadline - time.monotonic()) > 0:
            fds = [self.fd] + ([self.err] if self.err is not None else [])
            ready, _, _ = select.select(fds, [], [], left)
            if self.err is not None and self.err in ready:
                self._read_err()
            if self.fd in ready:
                return True
        return False

    def readinto(self, b) -> int:
        if not self._wait_out(time.monotonic() + self.timeout):
            raise _Transient("shard_timeout", f"the command wrote nothing for {self.timeout:g}s")
        data = os.read(self.fd, len(b))
        if not data:
            deadline = time.monotonic() + self.timeout
            while self.err is not None and (left := deadline - time.monotonic()) > 0:  # the rest of stderr
                if select.select([self.err], [], [], min(left, 0.1))[0]:
                    self._read_err()
                elif self.proc.poll() is not None:
                    break  # it exited: what still holds its standard error open is not waited for
            try:
                code = self.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise _Transient("shard_timeout", f"the command did not exit {self.timeout:g}s after its "
                                 "output ended") from None
            if code != 0:
                tail = self.tail[-300:].decode("utf-8", "replace").strip().replace("\n", " | ")
                detail = f"exit status {code}" + (f": {tail}" if tail else "")
                raise _Transient("shard_command_failed", detail)
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, 9)
                except OSError:
                    pass
            self.proc.stdout.close()
            self.proc.stderr.close()
            self.proc.wait()
            self.reaper.kill()
            self.reaper.wait()
        super().close()


class ShardReader(io.RawIOBase):
    """A remote shard as a forward-only binary stream: opens lazily, retries transient failures with
    backoff, resuming at its position (module docstring). `tell()` is the position; not seekable.

    A shard that fails for good ends there, as if the file ended, and keeps the `ShardError` in `error`: a
    reader (`kosmos.data.format.iter_tar`) thus gets every byte before the failure, then counts the error's
    reason. With `strict`, the error is raised instead."""

    def __init__(self, spec: str, options: ReadOptions | None = None, strict: bool = False):
        self.spec, self.options, self.strict = spec, options or DEFAULT, strict
        self.error: ShardError | None = None
        self.pos = 0
        self.total: int | None = None
        self._f = None
        self._tries = 0
        self._window = (0.0, 0)  # (time, position) the current speed window started at

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _open(self) -> None:
        spec, t = self.spec, self.options.timeout
        if spec.startswith(PIPE):
            f, start = _Pipe(spec, t), 0
        elif _protocol(spec) in ("http", "https"):
            f, total, start = _http(spec, self.pos, t)
            self.total = total if total is not None else self.total
        else:
            try:
                fs, path = _fsspec(spec)
            except ValueError as e:
                raise ShardError(spec, "shard_unreadable", str(e).split(": ", 1)[-1]) from None
            try:
                f = fs.open(path, "rb")
            except FileNotFoundError:
                raise ShardError(spec, "shard_not_found", "no such object") from None
            except Exception as e:  # noqa: BLE001 - OSError, and the protocol library's own (botocore, aiohttp)
                raise _Transient("shard_unreadable", _oneline(e)) from None
            if self.pos:
                f.seek(self.pos)
            start = self.pos
        self._f = f
        self._window = (time.monotonic(), self.pos)  # the speed floor's window (_read_raw)
        skip = self.pos - start  # a server that ignored the range, or a command: skip what was read
        if skip < 0:
            raise _Transient("shard_http_error", f"asked for byte {self.pos}, the answer starts at {start}")
        while skip > 0:
            got = self._read_raw(min(skip, 1 << 20))
            if not got:
                raise _Transient("shard_cut_short", f"ended at byte {self.pos - skip} on a retry")
            skip -= len(got)
        self._window = (time.monotonic(), self.pos)

    def _read_raw(self, n: int) -> bytes:
        try:
            # HTTP: what has arrived (read() would wait for all n bytes, so a trickle never reached the check)
            data = self._f.read1(n) if isinstance(self._f, http.client.HTTPResponse) else self._f.read(n)
        except _Transient:
            raise
        except TimeoutError:
            raise _Transient("shard_timeout", f"no byte for {self.options.timeout:g}s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise _Transient("shard_unreadable", _oneline(e)) from None
        except Exception as e:  # noqa: BLE001 - an fsspec protocol's library (botocore, aiohttp, ...)
            if isinstance(self._f, (_Pipe, http.client.HTTPResponse)):
                raise
            raise _Transient("shard_unreadable", _oneline(e)) from None
        now = time.monotonic()
        if self.options.min_speed and now - self._window[0] >= self.options.timeout:
            rate = (self.pos + len(data) - self._window[1]) / (now - self._window[0])
            if rate < self.options.min_speed:
                raise _Transient("shard_timeout",
                                 f"{rate:,.0f} bytes/s over {now - self._window[0]:.0f}s, below "
                                 f"data.read_min_speed={self.options.min_speed:g}")
            self._window = (now, self.pos + len(data))
        return data

    def _close_f(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self._f = None

    def readinto(self, b) -> int:
        if self.error is not None:
            return 0
        while True:
            try:
                if self._f is None:
                    self._open()
                data = self._read_raw(len(b))
                if not data and self.total is not None and self.pos < self.total:
                    raise _Transient("shard_cut_short", f"the body ended at byte {self.pos} of {self.total}")
                b[: len(data)] = data
                self.pos += len(data)
                return len(data)
            except (_Transient, ShardError) as e:
                self._close_f()
                if isinstance(e, ShardError) or self._tries >= self.options.retries:
                    tries = self._tries + 1
                    self.error = e if isinstance(e, ShardError) else ShardError(
                        self.spec, e.reason, f"{e.detail} ({tries} tr{'ies' if tries > 1 else 'y'})")
                    if self.strict:
                        raise self.error from None
                    return 0
                time.sleep(self.options.backoff * 2 ** self._tries)
                self._tries += 1

    def close(self) -> None:
        self._close_f()
        super().close()


class _Buffered(io.BufferedReader):
    """A buffered `ShardReader` that shows its `error`."""

    @property
    def error(self) -> ShardError | None:
        return self.raw.error


def open_shard(spec: str, options: ReadOptions | None = None, strict: bool = False) -> BinaryIO:
    """A binary file object reading the shard `spec`: a local file (seekable), or for a URL or pipe: a
    buffered, forward-only `ShardReader` (opened on the first read) whose `error` says why it ended early,
    or with `strict` that raises it. Raises FileNotFoundError or OSError for a local file that cannot be
    opened."""
    spec = str(spec)
    if not is_remote(spec):
        return open(spec, "rb")
    return _Buffered(ShardReader(spec, options, strict), buffer_size=1 << 16)

