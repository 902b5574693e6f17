"""One small API over local paths, ``s3://`` URIs and the object stores fsspec reaches.

* ``s3://`` (AWS S3, MinIO, any S3 API) through boto3, with its transfer manager
  (multipart over ``storage.multipart_threshold_mb``) and retries;
* ``gs://`` / ``gcs://`` (Google Cloud Storage, ``gcsfs``), ``abfs://`` / ``abfss://`` /
  ``az://`` (Azure Blob Storage and ADLS Gen2, ``adlfs``) and ``memory://`` through fsspec
  (``FSSPEC_SCHEMES``); the cloud's filesystem package is installed by whoever uses it
  (credentials from that cloud's usual environment), and a missing one is named in the
  error.  s3:// stays on boto3: ``s3fs`` pins an older botocore than the project's boto3.

* Writes are atomic: a local file is written under a temporary name and renamed; an S3
  object appears only when its PUT or multipart upload completes (boto3 aborts an
  unfinished multipart upload), so a reader never sees half an artifact.
* Every artifact folder gets a ``MANIFEST.json`` (sha256 and size per file), written last.
* URIs outside the configured roots are refused: writes only under ``artifact_root``,
  reads under ``artifact_root`` and ``allowed_roots``.

The same rules hold on every store: missing or refused objects are BadInput (exit 2),
network faults a TransientStorageError (exit 1, retried).

Light module: boto3 and fsspec are imported only when a remote URI is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from rlhf_tasks.errors import BadInput

MANIFEST = "MANIFEST.json"


# object stores reached through fsspec: scheme -> the package that provides it
FSSPEC_SCHEMES = {"gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "abfss": "adlfs",
                  "az": "adlfs", "memory": "fsspec"}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_fsspec(uri: str) -> bool:
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme in FSSPEC_SCHEMES


def is_remote(uri: str) -> bool:
    """An object-store URI (``s3://`` or an fsspec scheme), not a local path."""
    return is_s3(uri) or is_fsspec(uri)


def split_remote(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket or container, key) of a remote URI."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise BadInput(f"not an object-store URI: {uri!r}")
    return scheme, bucket, key


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise BadInput(f"not an S3 URI: {uri!r}")
    return bucket, key


def join(base: str, *names: str) -> str:
    out = base.rstrip("/")
    for name in names:
        out += "/" + name.strip("/")
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _local(uri: str) -> Path:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return Path(uri).expanduser().resolve()


def _s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 5):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                    connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
                        region_name=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        config=config)


# S3 error codes no retry can fix: the object, bucket or permission is not there
PERMANENT_S3_ERRORS = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket", "AccessDenied",
                                 "403", "InvalidBucketName", "InvalidObjectState", "400",
                                 "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def fsspec_error(exc: BaseException, uri: str) -> Exception:
    """As for S3: a missing object or a refused permission is BadInput (exit 2); anything
    else (a dropped connection, a 5xx) a TransientStorageError (exit 1, retried)."""
    if isinstance(exc, FileNotFoundError):
        return BadInput("file not found", file=uri)
    if isinstance(exc, PermissionError):
        return BadInput(f"cannot read (permission denied): {exc}", file=uri)
    return TransientStorageError(f"{type(exc).__name__} on {uri}: {exc}")


def filesystem(uri: str):
    """(fsspec filesystem, path) for an fsspec URI; the filesystem's package missing is
    BadInput naming it."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(uri)
    except ImportError as exc:
        package = FSSPEC_SCHEMES.get(uri.partition("://")[0], "its fsspec implementation")
        raise BadInput(f"{uri.partition('://')[0]}:// needs the package {package} "
                       f"({exc})", file=uri) from None


class TransientStorageError(Exception):
    """A storage error a retry may fix (throttling, 5xx, a reset connection): exit 1."""


def s3_read_error(exc, uri: str) -> Exception:
    """BadInput (exit 2) for a missing object or a refused permission; a
    TransientStorageError (exit 1, Airflow retries) for throttling, 5xx and the like."""
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if code in PERMANENT_S3_ERRORS:
        return BadInput(f"cannot read ({code}): {exc}", file=uri)
    return TransientStorageError(f"S3 error {code or type(exc).__name__} reading {uri}: {exc}")


def read_text_unchecked(uri: str) -> str:
    """Read a config file before a Storage exists (endpoint from AWS_ENDPOINT_URL)."""
    if is_fsspec(uri):
        fs, path = filesystem(uri)
        try:
            body = fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - classified: bad input or a transient fault
            error = fsspec_error(exc, uri)
            raise type(error)(f"cannot read config {uri}: {exc}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"config file {uri} is not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start})") from None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # noqa: BLE001 - classified: bad input or a transient fault
        hint = ("" if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                else " (for MinIO or another S3 API set AWS_ENDPOINT_URL_S3: the config's "
                     "storage.s3_endpoint_url cannot be read before the config itself)")
        error = s3_read_error(exc, uri) if isinstance(exc, ClientError) else None
        if isinstance(error, BadInput):
            raise BadInput(f"cannot read config {uri}: {exc}{hint}") from None
        raise TransientStorageError(f"cannot read config {uri}: {exc}{hint}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"config file {uri} is not UTF-8 text ({exc.reason} at byte "
                       f"{exc.start})") from None


class Storage:
    """Reads and writes artifacts under configured roots: locally, on S3, or on an object
    store fsspec reaches."""

    def __init__(self, artifact_root: str, allowed_roots: list[str] | tuple[str, ...] = (), *,
                 s3_endpoint_url: str | None = None, s3_region: str | None = None,
                 multipart_threshold_mb: int = 8, max_attempts: int = 5):
        self.artifact_root = self.normalise(artifact_root)
        self.read_roots = [self.artifact_root] + [self.normalise(r) for r in allowed_roots]
        self.endpoint_url, self.region = s3_endpoint_url, s3_region
        self.multipart_threshold = multipart_threshold_mb * 1024 * 1024
        self.max_attempts = max_attempts
        self._client = None

    @classmethod
    def from_config(cls, cfg, extra_read_roots: list[str] | tuple[str, ...] = ()) -> "Storage":
        s = cfg.storage
        return cls(s.artifact_root, list(s.allowed_roots) + list(extra_read_roots),
                   s3_endpoint_url=s.s3_endpoint_url, s3_region=s.s3_region,
                   multipart_threshold_mb=s.multipart_threshold_mb, max_attempts=s.max_attempts)

    # -- roots -------------------------------------------------------------------------
    @staticmethod
    def normalise(uri: str) -> str:
        if is_remote(uri):
            scheme, bucket, key = split_remote(uri)
            parts = [p for p in key.split("/") if p]
            if bucket in (".", "..") or any(p in (".", "..") for p in parts):
                raise BadInput(f"{scheme}:// URI may not contain '.' or '..' segments: {uri}")
            return f"{scheme}://" + "/".join([bucket] + parts)
        if "://" in uri and not uri.startswith("file://"):
            raise BadInput(f"unsupported storage scheme {uri.partition('://')[0]!r} in {uri} "
                           f"(local paths, s3:// and {', '.join(sorted(FSSPEC_SCHEMES))}://)")
        return str(_local(uri))

    @staticmethod
    def _under(uri: str, root: str) -> bool:
        return uri == root or uri.startswith(root.rstrip("/") + "/")

    def check_read(self, uri: str) -> str:
        norm = self.normalise(uri)
        if not any(self._under(norm, root) for root in self.read_roots):
            raise BadInput(f"{uri} is outside the configured storage roots "
                           f"({', '.join(self.read_roots)}); add its folder to "
                           "storage.allowed_roots")
        return norm

    def check_write(self, uri: str) -> str:
        norm = self.normalise(uri)
        if not self._under(norm, self.artifact_root):
            raise BadInput(f"refusing to write {uri}: outside artifact_root {self.artifact_root}")
        return norm

    @property
    def s3(self):
        if self._client is None:
            self._client = _s3_client(self.endpoint_url, self.region, self.max_attempts)
        return self._client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_threshold)

    @staticmethod
    def _fs_call(uri: str, call):
        """``call(fs, path)`` on the fsspec filesystem of ``uri``, its errors classified."""
        fs, path = filesystem(uri)
        try:
            return call(fs, path)
        except BadInput:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: bad input or a transient fault
            raise fsspec_error(exc, uri) from None

    # -- reads -------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        uri = self.check_read(uri)
        if is_fsspec(uri):
            return self._fs_call(uri, lambda fs, path: fs.isfile(path))
        if not is_s3(uri):
            return Path(uri).exists()
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def size(self, uri: str) -> int:
        uri = self.check_read(uri)
        if is_fsspec(uri):
            return int(self._fs_call(uri, lambda fs, path: fs.size(path)))
        if not is_s3(uri):
            try:
                return Path(uri).stat().st_size
            except FileNotFoundError:
                raise BadInput("file not found", file=uri) from None
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            return int(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            raise s3_read_error(exc, uri) from None

    def read_bytes(self, uri: str) -> bytes:
        uri = self.check_read(uri)
        if is_fsspec(uri):
            return self._fs_call(uri, lambda fs, path: fs.cat_file(path))
        if not is_s3(uri):
            try:
                return Path(uri).read_bytes()
            except FileNotFoundError:
                raise BadInput("file not found", file=uri) from None
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            raise s3_read_error(exc, uri) from None

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri).decode("utf-8"))

    @contextlib.contextmanager
    def local_copy(self, uri: str) -> Iterator[Path]:
        """A local path for ``uri``: the file itself, or a temporary download."""
        uri = self.check_read(uri)
        if is_fsspec(uri):
            with tempfile.TemporaryDirectory(prefix="rlhf-fs-") as tmp:
                target = Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]
                self._fs_call(uri, lambda fs, path: fs.get_file(path, str(target)))
                yield target
            return
        if not is_s3(uri):
            path = Path(uri)
            if not path.exists():
                raise BadInput("file not found", file=uri)
            yield path
            return
        bucket, key = split_s3(uri)
        with tempfile.TemporaryDirectory(prefix="rlhf-s3-") as tmp:
            target = Path(tmp) / Path(key).name
            from botocore.exceptions import ClientError

            try:
                self.s3.download_file(bucket, key, str(target), Config=self._transfer_config())
            except ClientError as exc:
                raise s3_read_error(exc, uri) from None
            yield target

    def list(self, prefix: str) -> list[str]:
        """Every file under ``prefix`` (recursively), as full URIs, sorted."""
        prefix = self.check_read(prefix)
        if is_fsspec(prefix):
            scheme = prefix.partition("://")[0]
            root = prefix.rstrip("/") + "/"

            def found(fs, path):
                if not fs.isdir(path):
                    return []
                names = [p for p in fs.find(path) if fs.isfile(p)]
                # fsspec paths drop the scheme (memory:// adds a leading '/'): put it back
                return [f"{scheme}://{p.lstrip('/')}" for p in names]

            return sorted(u for u in self._fs_call(prefix, found) if u.startswith(root))
        if not is_s3(prefix):
            root = Path(prefix)
            if not root.is_dir():
                return []
            return sorted(str(p) for p in root.rglob("*") if p.is_file())
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        return sorted(out)

    def get_dir(self, uri: str, local_dir: str | Path, *, verify: bool = True) -> Path:
        """Copy an artifact folder to ``local_dir``, checking each file against its manifest."""
        uri = self.check_read(uri)
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.read_json(join(uri, MANIFEST)) if verify else None
        names = list(manifest["files"]) if manifest else [
            f[len(uri) + 1:] for f in self.list(uri)]
        # a manifest (or a key) read back from the store names where each file goes: every
        # name must stay inside the destination folder, checked before anything is written
        root = local_dir.resolve()
        for name in names:
            if Path(name).is_absolute() or not (local_dir / name).resolve().is_relative_to(root):
                raise BadInput(f"refusing to write '{name}' outside {local_dir}",
                               file=join(uri, MANIFEST))
        for name in names:
            target = local_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = join(uri, name)
            if is_fsspec(src):
                self._fs_call(src, lambda fs, path: fs.get_file(path, str(target)))
            elif is_s3(src):
                bucket, key = split_s3(src)
                self.s3.download_file(bucket, key, str(target), Config=self._transfer_config())
            else:
                shutil.copyfile(src, target)
            if manifest and sha256_file(target) != manifest["files"][name]["sha256"]:
                raise BadInput(f"sha256 mismatch against {MANIFEST}", file=src)
        return local_dir

    # -- writes ------------------------------------------------------------------------
    def put_file(self, local_path: str | Path, uri: str) -> str:
        """Copy a local file to ``uri`` atomically; returns the normalised URI."""
        uri = self.check_write(uri)
        if is_fsspec(uri):
            # object stores make an object visible only once its upload is committed
            self._fs_call(uri, lambda fs, path: fs.put_file(str(local_path), path))
            return uri
        if is_s3(uri):
            bucket, key = split_s3(uri)
            # upload_file completes a multipart upload only when every part is in, and
            # aborts it on error: the key never holds a partial object.
            self.s3.upload_file(str(local_path), bucket, key, Config=self._transfer_config())
            return uri
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copyfile(local_path, tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return uri

    def write_bytes(self, uri: str, data: bytes) -> str:
        uri = self.check_write(uri)
        if is_fsspec(uri):
            self._fs_call(uri, lambda fs, path: fs.pipe_file(path, data))
            return uri
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
            return uri
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return uri

    def write_json(self, uri: str, obj) -> str:
        return self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))

    def put_dir(self, local_dir: str | Path, uri: str, extra: dict | None = None) -> dict:
        """Upload every file of ``local_dir`` under ``uri``, then its manifest (last).

        A folder whose ``MANIFEST.json`` exists is whole; readers trust nothing else.
        """
        return self.write_manifest(uri, self.put_files(local_dir, uri), extra)

    def put_files(self, local_dir: str | Path, uri: str) -> dict:
        """Upload every file of ``local_dir`` under ``uri`` (no manifest: several writers
        of one folder, e.g. the processes of a sharded checkpoint, each put their own and
        one writes the manifest of all); returns {name: {sha256, bytes}}."""
        uri = self.check_write(uri)
        local_dir = Path(local_dir)
        files = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = path.relative_to(local_dir).as_posix()
            if name == MANIFEST:
                continue
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            self.put_file(path, join(uri, name))
        return files

    def write_manifest(self, uri: str, files: dict, extra: dict | None = None) -> dict:
        uri = self.check_write(uri)
        manifest = {"files": files, "created_unix": round(time.time(), 3), **(extra or {})}
        self.write_json(join(uri, MANIFEST), manifest)
        return manifest

    def is_complete(self, uri: str) -> bool:
        return self.exists(join(uri, MANIFEST))
