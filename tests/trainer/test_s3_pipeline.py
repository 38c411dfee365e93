"""S3 storage end to end against moto's S3 server: data read from S3, checkpoints and models uploaded, and the next
stage loading its input model from s3://."""

import json

import boto3
import pytest
from stage_helpers import DATA, FAST_TRAINING, job_spec, run_cli, write_manifest

from finetune_trainer import storage

pytestmark = [pytest.mark.train, pytest.mark.slow]


def test_cpt_then_sft_on_s3(tmp_path, tiny_model_dir, s3_bucket, s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.upload_file(str(DATA / "domain.txt"), s3_bucket, "data/domain.txt")
    client.upload_file(str(DATA / "instruct.jsonl"), s3_bucket, "data/instruct.jsonl")
    root = f"s3://{s3_bucket}/jobs/e2e"
    stages = [
        {"name": "domain", "type": "cpt", "dataset": {"uri": f"s3://{s3_bucket}/data/domain.txt"}},
        {"name": "instruct", "type": "sft", "dataset": {"uri": f"s3://{s3_bucket}/data/instruct.jsonl"}},
    ]
    spec = job_spec(
        tiny_model_dir, root, stages, training={**FAST_TRAINING, "maxSteps": 10, "saveSteps": 5, "saveTotalLimit": 1}
    )
    spec_wire = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec_wire["storage"]["endpointUrl"] = s3_server
    manifest = write_manifest(tmp_path / "job.yaml", spec_wire)
    status_file = tmp_path / "status.json"

    result = run_cli("run", str(manifest), "--status-file", str(status_file), "--no-ray", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # sft's input is cpt's S3 output
    assert f"stage instruct (2/2) attempt 1 starting, from {root}/domain/model" in result.stdout

    status = json.loads(status_file.read_text())
    assert [s["checkpoint"] for s in status["stages"]] == [f"{root}/domain/model", f"{root}/instruct/model"]
    for name in ("domain", "instruct"):
        assert storage.exists(f"{root}/{name}/model/config.json") and storage.exists(
            f"{root}/{name}/model/model.safetensors"
        )
        # saveTotalLimit 1: only the newest complete checkpoint is kept in the bucket.
        assert storage.list_checkpoints(f"{root}/{name}/checkpoints") == [
            (10, f"{root}/{name}/checkpoints/checkpoint-10")
        ]
        assert storage.exists(f"{root}/{name}/checkpoints/checkpoint-10/optimizer.pt")
