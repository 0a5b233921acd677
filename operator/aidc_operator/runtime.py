"""Process-wide pieces the handlers share: the watch-fed store and the operator's run settings (set by
main.cli before kopf starts)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .cache import Store

STORE = Store()


@dataclass
class RunConfig:
    namespaces: list[str] = field(default_factory=list)  # --namespace patterns; empty: all namespaces
    job_workers: int = int(os.environ.get("AIDC_TRAININGJOB_WORKERS", "4"))
    service_workers: int = int(os.environ.get("AIDC_INFERENCESERVICE_WORKERS", "2"))


CONFIG = RunConfig()
