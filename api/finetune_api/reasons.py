"""Condition and Event reasons: the one vocabulary of status, Events, the trainer's reports and
docs/troubleshooting.md. `PERMANENT` lists the failures that no retry can fix."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # The current stage is being started: its RayJob (or local process) was just created.
    STAGE_STARTING = "StageStarting"
    # The stage's Ray cluster is coming up (KubeRay: Initializing/Waiting); the message carries KubeRay's.
    CLUSTER_INITIALIZING = "ClusterInitializing"
    # Kueue holds the stage's RayJob (suspended until its workload is admitted); the message names the queue.
    QUEUED = "Queued"
    # The stage's Ray cluster did not come up within the operator's start timeout; the message carries the pods'
    # own reasons (Unschedulable, ImagePullBackOff, ...).
    START_TIMEOUT = "StartTimeout"
    # The attempt's RayJob (or local process) disappeared after it started, e.g. deleted by hand.
    ATTEMPT_LOST = "AttemptLost"
    # The API server refused to create one of the attempt's children (admission webhook, Pod Security, quota).
    CHILD_REFUSED = "ChildRefused"
    # The stage's trainer is running.
    STAGE_RUNNING = "StageRunning"
    # A stage finished and wrote its output model.
    STAGE_SUCCEEDED = "StageSucceeded"
    # Every stage succeeded.
    ALL_STAGES_SUCCEEDED = "AllStagesSucceeded"
    # The trainer stopped on an unexpected error (retried from the latest checkpoint).
    TRAINING_FAILED = "TrainingFailed"
    # The trainer was interrupted (SIGINT/SIGTERM); the next attempt resumes from the latest checkpoint.
    INTERRUPTED = "Interrupted"
    # A stage attempt failed; alone it means a failure that was not retried further for another reason.
    STAGE_FAILED = "StageFailed"
    # A stage failed `backoffLimit + 1` times.
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    # An attempt failed and the next one will resume from the stage's latest checkpoint.
    RETRYING_FROM_CHECKPOINT = "RetryingFromCheckpoint"
    # A resumable checkpoint was saved (Event only).
    CHECKPOINT_SAVED = "CheckpointSaved"
    # `spec.suspend` is true: nothing runs, checkpoints are kept.
    SUSPENDED = "Suspended"
    # `spec.suspend` went back to false.
    RESUMED = "Resumed"
    # The job ran longer than `activeDeadlineSeconds` (suspended time excluded).
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    # A Secret the spec names does not exist (yet); re-checked periodically.
    SECRET_NOT_FOUND = "SecretNotFound"
    # The runtime a job's `spec.runtimeRef` names does not exist (yet); re-checked periodically, like a Secret.
    RUNTIME_NOT_FOUND = "RuntimeNotFound"
    # The job breaks its runtime's policy (a locked field, a limit, an image or model outside the allowed prefixes);
    # the message names the job's field.
    POLICY_VIOLATION = "PolicyViolation"
    # The spec fails validation (e.g. an unknown URI scheme) or changed in a way a started job cannot follow.
    INVALID_SPEC = "InvalidSpec"
    # KubeRay rejected the RayJob it was given (its `ValidationFailed` deployment status).
    RAYJOB_VALIDATION_FAILED = "RayJobValidationFailed"
    # Reported by the trainer; permanent (see PERMANENT).
    QUALITY_GATE_FAILED = "QualityGateFailed"
    KL_LIMIT_EXCEEDED = "KLLimitExceeded"
    INVALID_DATASET = "InvalidDataset"
    # A stage made an `evaluation.suites` held-out set worse than its `maxRegression` allows (catastrophic
    # forgetting); the same data and settings forget again, so it is permanent. The message names suite and amount.
    FORGETTING_DETECTED = "ForgettingDetected"
    INVALID_MODEL = "InvalidModel"
    INVALID_CONFIG = "InvalidConfig"
    # A training or held-out loss, or a weight, became NaN/inf (e.g. a learning rate far too high); retrying the same
    # settings diverges again, so it is permanent. The last good checkpoint is kept.
    TRAINING_DIVERGED = "TrainingDiverged"
    # The API server refused a status patch (Event, and a `StatusUpdated=False` condition); the message carries why.
    STATUS_PATCH_REFUSED = "StatusPatchRefused"
    # A worker that `resources.gpusPerWorker` gives GPUs sees no CUDA device (driver, device plugin or image).
    GPU_UNAVAILABLE = "GPUUnavailable"
    # Reported by the trainer: storage did not answer (connection refused, timeout, 5xx, throttling); retried.
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    # The job is waiting for its first stage to start.
    PENDING = "Pending"
    # The FineTuneJob was deleted `ttlSecondsAfterFinished` after finishing (Event only).
    TTL_EXPIRED = "TTLExpired"
    # A `pvc://` claim every Ray pod mounts is not ReadWriteMany: pods on a second node cannot attach it (Event only).
    STORAGE_NOT_SHARED = "StorageNotShared"
    # Finalizer work on deletion (Events only): children could not be deleted (retried); artifacts removed on request.
    CLEANUP_FAILED = "CleanupFailed"
    ARTIFACTS_DELETED = "ArtifactsDeleted"


# Failures that no retry can fix: the operator fails the stage at once, and the stage entrypoint exits with
# EXIT_PERMANENT_FAILURE for them.
PERMANENT = frozenset(
    {
        Reason.INVALID_CONFIG,
        Reason.INVALID_DATASET,
        Reason.INVALID_MODEL,
        Reason.QUALITY_GATE_FAILED,
        Reason.FORGETTING_DETECTED,
        Reason.KL_LIMIT_EXCEEDED,
        Reason.TRAINING_DIVERGED,
        Reason.GPU_UNAVAILABLE,
        Reason.POLICY_VIOLATION,
    }
)
