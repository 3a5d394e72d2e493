"""Remote shard reading (kosmos/data/remote.py) against local files, for the same caption shards.

    python bench/remote.py [--images 2000] [--repeat 3]

Makes caption shards of 256 px JPEGs (as bench/data.py does), serves them from a loopback HTTP server
(Python's http.server in a process of its own, range requests supported) and reads them, in one process, as:
  local    the files
  http     http://127.0.0.1:PORT/... through kosmos.data.remote (urllib, streamed)
  pipe     pipe:cat FILE
twice each: the raw bytes (MB/s), and the samples as training reads them (`kosmos.data.shards.read_shard`,
members grouped into samples, images not decoded; samples/s). Best of --repeat. Loopback measures the
reader's own cost, not a network: real object storage adds latency and bandwidth limits per connection,
which more workers (data.<source>.workers) hide.
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of the served folder, with range requests (SimpleHTTPRequestHandler has none)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)


def _serve(folder: str, port) -> None:
    handler = lambda *a, **kw: _Handler(*a, directory=folder, **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port.value = httpd.server_address[1]
    httpd.serve_forever()


def serve(folder: Path):
    """The server in a process of its own (in this one, it would share the reader's GIL)."""
    port = multiprocessing.Value("i", 0)
    proc = multiprocessing.Process(target=_serve, args=(str(folder), port), daemon=True)
    proc.start()
    while not port.value:
        time.sleep(0.01)
    return proc, f"http://127.0.0.1:{port.value}"


def read_bytes(specs: list[str]) -> tuple[int, float]:
    from kosmos.data.remote import open_shard

    n, t0 = 0, time.perf_counter()
    for spec in specs:
        with open_shard(spec) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
            if getattr(f, "error", None) is not None:
                raise f.error
    return n, time.perf_counter() - t0


def read_samples(specs: list[str]) -> tuple[int, float]:
    from kosmos.data.shards import read_shard

    skipped: Counter = Counter()
    n, t0 = 0, time.perf_counter()
    for spec in specs:
        for _ in read_shard(spec, skipped):
            n += 1
    assert not skipped, skipped
    return n, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    from bench.data import make_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_shards(tmp, args.images)
        server, base = serve(tmp)
        ways = {"local": paths, "http": [f"{base}/{Path(p).name}" for p in paths],
                "pipe": [f"pipe:cat {p}" for p in paths]}
        read_bytes(paths)  # warm the page cache
        rows = []
        for name, specs in ways.items():
            nb, tb = min((read_bytes(specs) for _ in range(args.repeat)), key=lambda r: r[1])
            ns, ts = min((read_samples(specs) for _ in range(args.repeat)), key=lambda r: r[1])
            rows.append((name, nb / tb / 1e6, ns / ts))
        server.terminate()
        server.join()
    mb = nb / 1e6
    print(f"remote read bench: {len(paths)} caption shards, {args.images} samples, {mb:.1f} MB, "
          f"one process, best of {args.repeat}")
    print(f"  {'way':<6} {'bytes MB/s':>11} {'samples/s':>10} {'vs local':>9}")
    for name, mbps, sps in rows:
        print(f"  {name:<6} {mbps:11.1f} {sps:10.0f} {sps / rows[0][2]:9.2f}")


if __name__ == "__main__":
    main()
