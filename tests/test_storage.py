"""Storage over local paths and a real S3 API over HTTP (moto's server mode)."""

import hashlib
import json
import os

import pytest

from rlhf_tasks.errors import BadInput
from rlhf_tasks.storage import MANIFEST, Storage


def test_local_atomic_write_and_manifest(tmp_path):
    st = Storage(str(tmp_path / "art"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    manifest = st.put_dir(src, str(tmp_path / "art" / "step"))
    assert manifest["files"]["a.txt"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert st.is_complete(str(tmp_path / "art" / "step"))
    assert not [p for p in (tmp_path / "art").rglob("*.tmp-*")]
    out = st.get_dir(str(tmp_path / "art" / "step"), tmp_path / "copy")
    assert (out / "sub" / "b.bin").read_bytes() == b"\x00" * 10


def test_tampered_file_is_detected(tmp_path):
    st = Storage(str(tmp_path / "art"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    st.put_dir(src, str(tmp_path / "art" / "s"))
    (tmp_path / "art" / "s" / "a.txt").write_text("changed")
    with pytest.raises(BadInput, match="sha256 mismatch"):
        st.get_dir(str(tmp_path / "art" / "s"), tmp_path / "copy")


def test_roots_are_enforced(tmp_path):
    st = Storage(str(tmp_path / "art"), [str(tmp_path / "data")])
    with pytest.raises(BadInput, match="outside artifact_root"):
        st.write_bytes(str(tmp_path / "elsewhere.txt"), b"x")
    with pytest.raises(BadInput, match="outside the configured storage roots"):
        st.check_read("/etc/passwd")
    with pytest.raises(BadInput, match="outside"):
        st.write_bytes(str(tmp_path / "art" / ".." / "escape.txt"), b"x")
    assert st.check_read(str(tmp_path / "data" / "x.jsonl")).endswith("x.jsonl")
    s3 = Storage("s3://bucket/prefix")
    with pytest.raises(BadInput, match="outside artifact_root"):
        s3.check_write("s3://bucket/prefix-other/x")
    with pytest.raises(BadInput, match=r"'\.\.'"):
        s3.check_write("s3://bucket/prefix/../x")


def test_s3_roundtrip_and_multipart(tmp_path, s3_endpoint, bucket):
    import boto3

    st = Storage(f"s3://{bucket}/runs", s3_endpoint_url=s3_endpoint, multipart_threshold_mb=8)
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(9 * 1024 * 1024 + 123)  # over 8 MiB: a multipart upload
    (src / "model.safetensors").write_bytes(big)
    (src / "config.json").write_text('{"a": 1}')
    uri = f"s3://{bucket}/runs/p/r/step"
    manifest = st.put_dir(src, uri)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    head = client.head_object(Bucket=bucket, Key="runs/p/r/step/model.safetensors")
    assert head["ContentLength"] == len(big)
    assert "-" in head["ETag"], "expected a multipart ETag (md5-of-parts with a part count)"
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(big).hexdigest()
    assert st.is_complete(uri)
    assert sorted(f.rsplit("/", 1)[1] for f in st.list(uri)) == [MANIFEST, "config.json",
                                                                 "model.safetensors"]
    copy = st.get_dir(uri, tmp_path / "copy")
    assert (copy / "model.safetensors").read_bytes() == big
    assert st.read_json(uri + "/config.json") == {"a": 1}
    assert st.size(uri + "/model.safetensors") == len(big)
    assert not st.exists(uri + "/nope")


def test_s3_dataset_validates_from_s3(tmp_path, s3_endpoint, bucket, tokenizer):
    """A dataset on S3 goes through the same reader and rules."""
    from rlhf_tasks import config
    from rlhf_tasks.data import validation

    st = Storage(f"s3://{bucket}/art", [f"s3://{bucket}/data"], s3_endpoint_url=s3_endpoint)
    import boto3

    body = "\n".join(json.dumps({"prompt": f"p{i}", "chosen": "Led it, cutting costs by 10%",
                                 "rejected": "helped"}) for i in range(5))
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="data/p.jsonl",
                                                            Body=body.encode())
    cfg = config.validate({"data": {"min_preference_rows": 1}})
    out = validation.validate_dataset(storage=st, uri=f"s3://{bucket}/data/p.jsonl",
                                      kind="preference", fmt="auto", load_tokenizer=lambda: tokenizer,
                                      data_cfg=cfg.data, eval_keys=None, docs_dir=tmp_path / "d")
    assert out.rows_kept == 5
    with pytest.raises(BadInput, match="outside the configured storage roots"):
        st.read_bytes(f"s3://{bucket}/secret/x")


@pytest.mark.parametrize("code,status,transient", [
    ("SlowDown", 503, True), ("InternalError", 500, True), ("RequestTimeout", 400, True),
    ("NoSuchKey", 404, False), ("AccessDenied", 403, False)])
def test_s3_errors_are_bad_input_or_transient(code, status, transient):
    """Throttling and 5xx are faults (exit 1: Airflow retries); a missing object or a
    refused permission is bad input (exit 2: no retry helps)."""
    from botocore.stub import Stubber

    from rlhf_tasks.errors import BadInput
    from rlhf_tasks.storage import TransientStorageError

    storage = Storage("s3://bucket/root", s3_endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with Stubber(storage.s3) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        with pytest.raises(TransientStorageError if transient else BadInput, match=code):
            storage.read_bytes("s3://bucket/root/x.json")


@pytest.mark.parametrize("name", ["../escaped.txt", "a/../../escaped.txt", "/tmp/escaped.txt"])
def test_get_dir_refuses_manifest_names_outside_the_destination(tmp_path, name):
    """An artifact folder's manifest is read back from the store: a name that climbs out
    of the destination is refused before anything is written."""
    root = tmp_path / "store"
    folder = root / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    (folder / MANIFEST).write_text(json.dumps({"files": {
        "weights.bin": {"sha256": digest, "bytes": 1}, name: {"sha256": digest, "bytes": 1}}}))
    storage = Storage(str(root))
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(BadInput, match="outside"):
        storage.get_dir(str(folder), dest)
    assert not (tmp_path / "dest" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not (dest / "weights.bin").exists()  # nothing at all was copied


@pytest.fixture()
def memory_store():
    """fsspec's in-memory object store, emptied around each test (it is process-wide)."""
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    yield MemoryFileSystem
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def test_an_fsspec_store_keeps_the_same_rules(tmp_path, memory_store, tokenizer):
    """gs://, abfs:// and the other fsspec stores go through one path, tried here on
    fsspec's memory store: roots, '..', manifests written last and checked on the way
    back, a dataset validated from the store, a model folder fetched from it."""
    from rlhf_tasks import config, models
    from rlhf_tasks.data import validation

    st = Storage("memory://team/runs", ["memory://team/data"])
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"\x01" * 10)
    manifest = st.put_dir(src, "memory://team/runs/r1/model")
    assert set(manifest["files"]) == {"config.json", "sub/b.bin"}
    assert st.is_complete("memory://team/runs/r1/model")
    assert st.list("memory://team/runs/r1") == [
        "memory://team/runs/r1/model/MANIFEST.json", "memory://team/runs/r1/model/config.json",
        "memory://team/runs/r1/model/sub/b.bin"]
    assert st.list("memory://team/runs/none") == []
    out = st.get_dir("memory://team/runs/r1/model", tmp_path / "copy")
    assert (out / "sub" / "b.bin").read_bytes() == b"\x01" * 10
    cached = models.local_model_dir("memory://team/runs/r1/model", st,
                                    cache_dir=tmp_path / "cache")
    assert (cached / "sub" / "b.bin").read_bytes() == b"\x01" * 10
    memory_store.store["/team/runs/r1/model/sub/b.bin"].write(b"tampered")
    with pytest.raises(BadInput, match="sha256 mismatch"):
        st.get_dir("memory://team/runs/r1/model", tmp_path / "copy2")

    with pytest.raises(BadInput, match="outside artifact_root"):
        st.write_bytes("memory://team/data/x", b"x")
    with pytest.raises(BadInput, match=r"'\.\.'"):
        st.write_bytes("memory://team/runs/../data/x", b"x")
    with pytest.raises(BadInput, match="outside the configured storage roots"):
        st.read_bytes("memory://other/secret")
    with pytest.raises(BadInput, match="file not found"):
        st.read_bytes("memory://team/runs/missing.json")

    body = "\n".join(json.dumps({"prompt": f"p{i}", "chosen": "Led it, cutting costs by 10%",
                                 "rejected": "helped"}) for i in range(5))
    memory_store().pipe_file("/team/data/p.jsonl", body.encode())
    cfg = config.validate({"data": {"min_preference_rows": 1}})
    result = validation.validate_dataset(
        storage=st, uri="memory://team/data/p.jsonl", kind="preference", fmt="auto",
        load_tokenizer=lambda: tokenizer, data_cfg=cfg.data, eval_keys=None,
        docs_dir=tmp_path / "d")
    assert result.rows_kept == 5


def test_fsspec_faults_are_transient_and_a_missing_package_is_named(memory_store,
                                                                    monkeypatch):
    """A dropped connection is a fault (exit 1, retried), as on S3; a store whose fsspec
    package is not installed (gcsfs for gs://) is bad input naming the package."""
    from rlhf_tasks.storage import TransientStorageError

    st = Storage("memory://team/runs")
    st.write_bytes("memory://team/runs/x.json", b"{}")

    def dropped(self, path, *args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(memory_store, "cat_file", dropped)
    with pytest.raises(TransientStorageError, match="ConnectionResetError"):
        st.read_bytes("memory://team/runs/x.json")
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(BadInput, match="needs the package gcsfs"):
            Storage("gs://bucket/runs").read_bytes("gs://bucket/runs/x.json")
    with pytest.raises(BadInput, match="unsupported storage scheme 'ftp'"):
        Storage("ftp://host/runs")
