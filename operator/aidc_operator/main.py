"""The aidc operator: `python -m aidc_operator` (kopf), with peering for HA, probes and metrics."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import kopf
from prometheus_client import start_http_server

from . import handlers  # noqa: F401 - registers the handlers

PREFIX = "aidc.dev"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's bookkeeping goes to annotations under our prefix: the status schema stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/operator"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 30
    settings.peering.priority = int(os.environ.get("AIDC_PEERING_PRIORITY", "0"))
    settings.peering.lifetime = int(os.environ.get("AIDC_PEERING_LIFETIME", "20"))


@kopf.on.probe(id="alive")
def alive(**_: Any) -> bool:
    return True


def cli(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="aidc-operator", description=__doc__)
    ap.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="namespace (or glob) to serve; repeatable. Default: all namespaces",
    )
    ap.add_argument("--standalone", action="store_true", help="no peering (single replica, no HA)")
    ap.add_argument(
        "--peering",
        default=os.environ.get("AIDC_PEERING_NAME", "aidc"),
        help="peering object name: replicas sharing it elect one active operator",
    )
    ap.add_argument("--metrics-port", type=int, default=int(os.environ.get("AIDC_METRICS_PORT", "8000")))
    ap.add_argument("--health-port", type=int, default=int(os.environ.get("AIDC_HEALTH_PORT", "8080")))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # probes every few seconds
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.INFO)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=os.environ.get("AIDC_METRICS_ADDR", "0.0.0.0"))
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
