"""The aidc API: pydantic models of the custom resources, the single source of truth for the CRDs."""

from .base import API_VERSION, GROUP, VERSION, Condition
from .inferenceservice import InferenceServiceSpec, InferenceServiceStatus
from .trainingjob import TrainingJobSpec, TrainingJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "InferenceServiceSpec",
    "InferenceServiceStatus",
    "TrainingJobSpec",
    "TrainingJobStatus",
]
