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
