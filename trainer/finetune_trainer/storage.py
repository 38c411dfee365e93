"""Storage URIs: local paths, `file://`, `pvc://claim/path` (a mounted volume) and `s3://bucket/key`.

Local and PVC URIs map to paths on this machine; S3 objects are fetched into a local cache and uploaded back with boto3.
The S3 endpoint comes from `spec.storage.endpointUrl` or the standard AWS_ENDPOINT_URL variable (MinIO, moto, ...).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path

from finetune_api.render import PVC_MOUNT_ROOT, join_uri
from finetune_api.uris import pvc_path, uri_scheme

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written last when a checkpoint is synced, so a checkpoint without it is incomplete (e.g. killed mid-upload).
CHECKPOINT_COMPLETE_FILE = "trainer_state.json"


def pvc_root() -> Path:
    return Path(os.environ.get("FINETUNE_PVC_ROOT", PVC_MOUNT_ROOT))


def is_remote(uri: str) -> bool:
    return uri_scheme(uri) == "s3"


def local_path(uri: str) -> Path:
    """The filesystem path of a local, `file://` or `pvc://` URI; a `pvc://` path never leaves the claim's mount."""
    scheme = uri_scheme(uri)
    if scheme == "file":
        return Path(uri.removeprefix("file://")).expanduser()
    if scheme == "pvc":
        return pvc_path(uri, pvc_root())
    raise ValueError(f"{uri!r} is not a local path")


# S3 error codes that a later attempt may not see: throttling and the server's own trouble. Everything else S3 answers
# (no such key or bucket, access denied, a malformed request) is definitive.
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may go away by itself: connection refused, timeouts, 5xx and throttling."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES
    return isinstance(exc, ConnectionError | HTTPClientError | TimeoutError | ConnectionRefusedError)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def s3_client(endpoint_url: str | None = None):
    return _client_for(endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


@functools.lru_cache(maxsize=8)
def _client_for(endpoint_url: str | None):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def _s3_keys(client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether a file or a non-empty directory exists at `uri`."""
    if not is_remote(uri):
        path = local_path(uri)
        return path.is_file() or (path.is_dir() and any(path.iterdir()))
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    return bool(client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0))


def is_dir(uri: str, endpoint_url: str | None = None) -> bool:
    if not is_remote(uri):
        return local_path(uri).is_dir()
    bucket, key = split_s3(uri)
    listing = s3_client(endpoint_url).list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1)
    return bool(listing.get("KeyCount", 0))


def fetch(uri: str, cache: Path, endpoint_url: str | None = None) -> Path:
    """A local path holding the file or directory at `uri`; S3 objects are downloaded under `cache`."""
    if not is_remote(uri):
        return local_path(uri)
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    target = cache / bucket / key
    keys = _s3_keys(client, bucket, key + "/")
    if not keys:
        # A single object (e.g. a dataset file).
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
        return target
    for object_key in keys:
        destination = target / object_key[len(key) + 1 :]
        destination.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, object_key, str(destination))
    return target


def fetch_dir(uri: str, cache: Path, endpoint_url: str | None = None) -> Path:
    path = fetch(uri, cache, endpoint_url)
    if not path.is_dir():
        raise FileNotFoundError(f"{uri} is not a directory")
    return path


def upload_dir(
    local: Path, uri: str, endpoint_url: str | None = None, *, exclude: tuple[str, ...] = (), last: tuple[str, ...] = ()
) -> None:
    """Copy a directory tree to `uri`, skipping files named in `exclude`; files named in `last` go after all others."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in exclude)
    files.sort(key=lambda p: p.name in last)
    for path in files:
        upload_file(path, join_uri(uri, path.relative_to(local).as_posix()), endpoint_url)


def upload_file(local: Path, uri: str, endpoint_url: str | None = None) -> None:
    if is_remote(uri):
        bucket, key = split_s3(uri)
        s3_client(endpoint_url).upload_file(str(local), bucket, key)
        return
    destination = local_path(uri)
    if destination.resolve() == local.resolve():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Copy then rename, so a reader never sees a half-written file.
    partial = destination.with_name(destination.name + ".partial")
    shutil.copyfile(local, partial)
    partial.replace(destination)


def delete(uri: str, endpoint_url: str | None = None) -> None:
    """Remove a directory tree (or object prefix) at `uri`, if present."""
    if not is_remote(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    keys = _s3_keys(client, bucket, key + "/")
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]})


def list_checkpoints(uri: str, endpoint_url: str | None = None) -> list[tuple[int, str]]:
    """Complete `checkpoint-<step>` directories under `uri` as (step, URI), oldest first."""
    found: list[tuple[int, str]] = []
    if not is_remote(uri):
        root = local_path(uri)
        if root.is_dir():
            for child in root.iterdir():
                match = CHECKPOINT_PATTERN.match(child.name)
                if match and (child / CHECKPOINT_COMPLETE_FILE).is_file():
                    found.append((int(match.group(1)), join_uri(uri, child.name)))
        return sorted(found)
    bucket, key = split_s3(uri)
    for object_key in _s3_keys(s3_client(endpoint_url), bucket, key + "/"):
        parts = object_key[len(key) + 1 :].split("/")
        match = CHECKPOINT_PATTERN.match(parts[0])
        if match and parts[1:] == [CHECKPOINT_COMPLETE_FILE]:
            found.append((int(match.group(1)), f"s3://{bucket}/{key}/{parts[0]}"))
    return sorted(found)
