"""The aidc operator: `python -m aidc_operator` (kopf), with peering for HA, probes and metrics."""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from typing import Any

import kopf
from prometheus_client import start_http_server

from . import handlers  # noqa: F401 - registers the handlers
from .kubeio import DEFAULT_BURST, DEFAULT_QPS
from .runtime import CONFIG

PREFIX = "aidc.dev"
_webhook: dict[str, Any] = {}  # set by cli(): where the admission webhook server listens, if anywhere
_namespaces: list[str] = []  # set by cli(): the --namespace patterns (empty: cluster-wide)


def is_exact(pattern: str) -> bool:
    """A plain namespace name, not a kopf glob/negation/list pattern."""
    return not set(pattern) & set("*?[]!,")


def default_priority(now: float | None = None) -> int:
    """Peering priority of a replica: older replicas win, so a replica joining (a rollout, a restart)
    stands by instead of taking over from the active one; random low bits break ties. kopf pauses every
    replica that sees a peer of equal priority, so equal priorities would leave nobody active."""
    started = int(time.time() if now is None else now)
    return (2**32 - started) * 2**20 + random.randrange(2**20)


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
    settings.peering.priority = int(os.environ.get("AIDC_PEERING_PRIORITY") or default_priority())
    settings.peering.lifetime = int(os.environ.get("AIDC_PEERING_LIFETIME", "20"))
    settings.peering.stealth = True  # keep-alives every few seconds would drown the log
    if _namespaces and all(is_exact(ns) for ns in _namespaces):
        # Known namespaces: nothing to discover, so no cluster-wide list/watch of Namespaces and CRDs,
        # and a namespaced install's RBAC can leave them out.
        settings.scanning.disabled = True
    if _webhook:
        # The chart (or the test) owns the webhook configurations and their CA bundle; kopf only serves.
        settings.admission.managed = None
        settings.admission.server = kopf.WebhookServer(
            addr=_webhook["addr"],
            port=_webhook["port"],
            certfile=_webhook["cert"],
            pkeyfile=_webhook["key"],
        )


@kopf.on.startup()
def check_peering(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """kopf waits, silently paused, until its peering object exists: say so at startup."""
    if settings.peering.standalone or not settings.peering.mandatory:
        return
    from kubernetes.client.exceptions import ApiException

    from .kubeio import custom

    name = settings.peering.name
    scopes: list[str | None] = [ns for ns in _namespaces if is_exact(ns)] if _namespaces else [None]
    for ns in scopes:
        try:
            if ns is None:
                custom().get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
            else:
                custom().get_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", name)
        except ApiException as e:
            what = f"ClusterKopfPeering {name!r}" if ns is None else f"KopfPeering {name!r} in {ns!r}"
            if e.status == 404:
                logger.warning(
                    f"{what} does not exist: this replica stays paused until it does (the Helm chart "
                    "creates it; run with --standalone for a single replica without peering)"
                )
            else:
                logger.warning(f"cannot read {what}: {e.status} {e.reason}")


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
    ap.add_argument(
        "--webhook-port",
        type=int,
        default=int(os.environ.get("AIDC_WEBHOOK_PORT", "0")),
        help="serve the admission webhooks (HTTPS) on this port; 0: no webhooks",
    )
    ap.add_argument("--webhook-addr", default=os.environ.get("AIDC_WEBHOOK_ADDR", "0.0.0.0"))
    ap.add_argument("--webhook-cert", help="PEM serving certificate (reloaded when the file changes)")
    ap.add_argument("--webhook-key", help="PEM private key of the serving certificate")
    ap.add_argument(
        "--api-qps",
        type=float,
        default=float(os.environ.get("AIDC_API_QPS", DEFAULT_QPS)),
        help="steady requests per second to the apiserver (client-side limit; 0: none)",
    )
    ap.add_argument(
        "--api-burst",
        type=int,
        default=int(os.environ.get("AIDC_API_BURST", DEFAULT_BURST)),
        help="requests allowed at once above --api-qps",
    )
    ap.add_argument(
        "--kueue",
        choices=["auto", "on", "off"],
        default=CONFIG.kueue,
        help="queue TrainingJobs labelled kueue.x-k8s.io/queue-name through Kueue Workloads "
        "(auto: when the cluster serves Kueue's API)",
    )
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    args = ap.parse_args(argv)
    if args.webhook_port:
        if not (args.webhook_cert and args.webhook_key):
            ap.error("--webhook-port needs --webhook-cert and --webhook-key")
        # kopf refuses to start with admission handlers but no server: register them only when serving.
        from .handlers import admission  # noqa: F401

        _webhook.update(
            addr=args.webhook_addr, port=args.webhook_port, cert=args.webhook_cert, key=args.webhook_key
        )
    _namespaces.extend(args.namespace)
    CONFIG.namespaces = list(args.namespace)
    CONFIG.kueue = args.kueue
    # Read by kubeio.api() when it builds the one client every request goes through.
    os.environ["AIDC_API_QPS"], os.environ["AIDC_API_BURST"] = str(args.api_qps), str(args.api_burst)
    # kopf's formatter prefixes messages about an object with [namespace/name]; json for log pipelines.
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()], log_prefix=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # probes every few seconds
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.INFO)
        # kopf says "Handler ... succeeded" for every custom-resource event it feeds to the cache: at a
        # thousand jobs that is most of the log and a good part of the CPU. Our Events are logged instead.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=os.environ.get("AIDC_METRICS_ADDR", "0.0.0.0"))
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
