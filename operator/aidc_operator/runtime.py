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
    # Kueue integration: "auto" turns it on when the cluster serves Kueue's Workload API (checked at
    # start-up); "on" insists, "off" ignores queue labels' queues (such jobs wait with a condition).
    kueue: str = os.environ.get("AIDC_KUEUE", "auto")
    kueue_served: bool = False  # what start-up found
    # Does the cluster serve gateway.networking.k8s.io/v1 HTTPRoutes (checked at start-up, then now and
    # then until it does: handlers/gateway_discovery.py)? Only then are HTTPRoutes watched and canaries
    # that name a gateway split by route weight.
    gateway_api_served: bool = False
    # And does it serve GRPCRoute there (Gateway API v1.1 and later)? Then gRPC calls are split too.
    grpc_routes_served: bool = False


CONFIG = RunConfig()
