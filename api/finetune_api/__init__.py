"""The FineTuneJob contract shared by the operator and the trainer.

Pure pydantic: importing this package pulls in neither kopf, kubernetes, torch nor ray.
"""

from finetune_api.spec import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    DatasetSpec,
    DeepSpeedSpec,
    FineTuneJob,
    FineTuneJobSpec,
    ModelSpec,
    PeftSpec,
    ResourcesSpec,
    StageSpec,
    StageType,
    StorageSpec,
    TrainingSpec,
)
from finetune_api.status import (
    Condition,
    ConditionType,
    FineTuneJobStatus,
    JobPhase,
    StagePhase,
    StageProgress,
    StageStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Condition",
    "ConditionType",
    "DatasetSpec",
    "DeepSpeedSpec",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "JobPhase",
    "ModelSpec",
    "PeftSpec",
    "ResourcesSpec",
    "StageProgress",
    "StagePhase",
    "StageSpec",
    "StageStatus",
    "StageType",
    "StorageSpec",
    "TrainingSpec",
]
