"""s3:// shards through s3fs against a local S3 server (moto's, started here on loopback): listing, batched
brace patterns, reads, resume, missing objects, and a training stream read by DataLoader workers (started
after the parent has used the file system). Skipped when s3fs or moto is not installed."""

from collections import Counter
from pathlib import Path

import pytest

from kosmos.data.shards import expand_shards, read_shard
from tests.helpers import caption_shards, interleaved_shards
from tests.test_remote import check_stream_resumes_as_local

BUCKET = "kosmos-test"


@pytest.fixture()
def s3(monkeypatch):
    """A moto S3 server on loopback, with s3fs pointed at it through the environment (as a user points it
    at MinIO or another S3-compatible store); yields a boto3 client."""
    pytest.importorskip("s3fs")
    server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    import fsspec

    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks the port
    srv.start()
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    for k, v in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=url).items():
        monkeypatch.setenv(k, v)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket=BUCKET)
    yield client
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    srv.stop()


def _put(client, paths, folder):
    for p in paths:
        client.upload_file(str(p), BUCKET, f"{folder}/{Path(p).name}")
    return [f"s3://{BUCKET}/{folder}/{Path(p).name}" for p in paths]


def _plain(it):
    return [(o, {k: v for k, v in raw.items() if k != "__url__"}) for o, raw in it]


def test_s3_shards_list_and_read_as_local(s3, tmp_path):
    shards = caption_shards(tmp_path / "d", 3, 6)
    urls = _put(s3, shards, "laion")
    s3.put_object(Bucket=BUCKET, Key="laion/sub/inner.tar", Body=b"x")  # a folder among the shards
    assert expand_shards([f"s3://{BUCKET}/laion/cap-{{000000..000002}}.tar"]) == urls
    assert expand_shards([f"s3://{BUCKET}/laion/cap-*.tar"]) == urls
    assert expand_shards([f"s3://{BUCKET}/laion/"]) == urls
    assert expand_shards([f"s3://{BUCKET}/laion/{{cap-000000.tar,sub}}"]) == [
        urls[0], f"s3://{BUCKET}/laion/sub/inner.tar"]
    with pytest.raises(FileNotFoundError, match="2 of the 5 shards.*cap-000003.tar"):
        expand_shards([f"s3://{BUCKET}/laion/cap-{{000000..000004}}.tar"])
    for path, url in zip(shards, urls, strict=True):
        skipped, failed = Counter(), {}
        local = _plain(read_shard(path, Counter()))
        assert len(local) == 6 and _plain(read_shard(url, skipped, failed=failed)) == local
        assert not skipped and not failed
        assert _plain(read_shard(url, Counter(), want=lambda o: o >= 3)) == local[3:]  # a resume's read
    for gone in (f"s3://{BUCKET}/laion/gone.tar", "s3://no-such-bucket/x.tar"):
        skipped, failed = Counter(), {}
        assert list(read_shard(gone, skipped, failed=failed)) == []
        assert skipped == {"shard_not_found": 1} and gone in failed


def test_training_stream_over_s3_in_workers_resumes_exactly(s3, tmp_path, tiny_tokenizer):
    """Workers start after the parent listed the bucket (s3fs runs an event loop thread, which a worker
    forked from the parent would not have): they read the same batches as from local files, and a resume
    continues exactly."""
    shards = interleaved_shards(tmp_path / "d", 3, 5, words=(5, 30))
    _put(s3, shards, "il")
    check_stream_resumes_as_local(shards, expand_shards([f"s3://{BUCKET}/il/"]), tiny_tokenizer)
