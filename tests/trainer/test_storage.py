"""Storage URIs: local, pvc:// (mapped under FINETUNE_PVC_ROOT) and s3:// against moto's S3 server."""

import pytest

from finetune_trainer import storage

pytestmark = pytest.mark.unit


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.bin").write_bytes(b"\x00\x01")
    return root


def test_pvc_uris_map_under_the_mount_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    assert storage.local_path("pvc://models/llama/v1") == tmp_path / "mnt" / "models" / "llama" / "v1"
    assert storage.local_path("file:///data/x") == storage.local_path("/data/x")
    storage.upload_dir(make_tree(tmp_path / "src"), "pvc://models/copy")
    assert (tmp_path / "mnt" / "models" / "copy" / "sub" / "b.bin").read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("uri", ["pvc://ckpts/../../etc", "pvc://ckpts/a/../../../x", "pvc:///etc", "pvc://../x"])
def test_a_pvc_path_never_leaves_the_claims_mount(tmp_path, monkeypatch, uri):
    monkeypatch.setenv("FINETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    with pytest.raises(ValueError, match="claim"):
        storage.local_path(uri)
    # Nothing is written where the traversal pointed.
    with pytest.raises(ValueError):
        storage.upload_file(make_tree(tmp_path / "src") / "a.txt", uri + "/status.json")
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x").exists()


def test_a_rooted_path_inside_a_claim_stays_inside_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    assert storage.local_path("pvc://ckpts//etc") == tmp_path / "mnt" / "ckpts" / "etc"
    assert storage.local_path("pvc://ckpts") == tmp_path / "mnt" / "ckpts"


def test_s3_round_trip(tmp_path, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/model"
    assert not storage.exists(uri)
    storage.upload_dir(make_tree(tmp_path / "src"), uri)
    assert storage.exists(uri) and storage.is_dir(uri)
    fetched = storage.fetch_dir(uri, tmp_path / "cache")
    assert (fetched / "a.txt").read_text() == "a" and (fetched / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    single = storage.fetch(f"{uri}/a.txt", tmp_path / "cache2")
    assert single.read_text() == "a"
    storage.delete(uri)
    assert not storage.exists(uri)


@pytest.mark.parametrize("remote", [False, True])
def test_only_complete_checkpoints_are_listed(tmp_path, remote, request):
    root = f"s3://{request.getfixturevalue('s3_bucket')}/job/checkpoints" if remote else str(tmp_path / "checkpoints")
    for step in (5, 10, 15):
        checkpoint = make_tree(tmp_path / f"local-{step}")
        storage.upload_dir(checkpoint, f"{root}/checkpoint-{step}")
        if step != 15:  # 15 was cut off before its completion marker
            (checkpoint / "trainer_state.json").write_text("{}")
            storage.upload_file(checkpoint / "trainer_state.json", f"{root}/checkpoint-{step}/trainer_state.json")
    assert storage.list_checkpoints(root) == [(5, f"{root}/checkpoint-5"), (10, f"{root}/checkpoint-10")]


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_storage_is_transient_and_a_missing_object_is_permanent(tmp_path, s3_bucket, monkeypatch):
    from finetune_api.spec import DatasetSpec
    from finetune_trainer import modeling
    from finetune_trainer.data import read_validated
    from finetune_trainer.errors import DataValidationError, ModelLoadError, StorageUnavailableError

    refused = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(StorageUnavailableError) as unreachable:
        modeling.resolve(f"s3://{s3_bucket}/models/base", tmp_path / "cache", refused)
    assert not unreachable.value.permanent and unreachable.value.reason == "StorageUnavailable"
    with pytest.raises(StorageUnavailableError):
        read_validated(
            "sft",
            f"s3://{s3_bucket}/d.jsonl",
            DatasetSpec(uri=f"s3://{s3_bucket}/d.jsonl"),
            [("text",)],
            tmp_path,
            refused,
        )

    with pytest.raises(ModelLoadError) as missing:
        modeling.resolve(f"s3://{s3_bucket}/models/absent", tmp_path / "cache")
    assert missing.value.permanent
    with pytest.raises(DataValidationError) as absent:
        read_validated(
            "sft",
            f"s3://{s3_bucket}/absent.jsonl",
            DatasetSpec(uri=f"s3://{s3_bucket}/absent.jsonl"),
            [("text",)],
            tmp_path,
        )
    assert absent.value.permanent


def test_throttling_and_server_errors_are_transient():
    from botocore.exceptions import ClientError

    def answer(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert storage.is_transient(answer("SlowDown", 503)) and storage.is_transient(answer("InternalError", 500))
    assert storage.is_transient(answer("Throttling", 400))
    assert not storage.is_transient(answer("NoSuchKey", 404)) and not storage.is_transient(answer("AccessDenied", 403))
    assert not storage.is_transient(ValueError("malformed"))
