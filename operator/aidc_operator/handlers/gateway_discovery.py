"""Which Gateway API route kinds the cluster serves, and picking them up when they are installed later.

The routes are optional: a cluster without the Gateway API CRDs splits canaries by replica ratio. Users
often install the CRDs after the operator (a platform team's chart, a GitOps sync), so, as Kueue does
for an integration whose CRD is missing, the operator checks discovery now and then (backing off to
once a minute: one request, whatever the number of objects) until both kinds are served. Once one is,
its informers start, and after they have synced the InferenceServices that name a Gateway are woken
so that their routes are made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException

from .. import kubeio
from ..builders import httproute
from ..builders.common import MANAGED_BY_SELECTOR as _SELECTOR
from ..cache import INFERENCESERVICE, key_of
from ..informer import Informer, Resource
from ..runtime import CONFIG, STORE
from .inferenceservice import SERVICES

log = logging.getLogger("aidc.cache")
# The HTTPRoutes and GRPCRoutes of weighted canaries (their status says whether a Gateway took them).
ROUTES = Resource(httproute.KIND, httproute.API_VERSION, httproute.PLURAL, selector=_SELECTOR)
GRPC_ROUTES = Resource(httproute.GRPC_KIND, httproute.API_VERSION, httproute.GRPC_PLURAL, selector=_SELECTOR)
RECHECK_SECONDS = (5.0, 60.0)  # the first wait between discovery checks, and the longest


def served_routes() -> list[Resource]:
    """The route kinds the cluster serves now (GRPCRoute from Gateway API v1.1 on); one request."""
    gateway = kubeio.served_resources(httproute.API_VERSION) or ()
    return [r for r in (ROUTES, GRPC_ROUTES) if r.plural in gateway]


def mark_served(routes: list[Resource]) -> None:
    for r in routes:
        if r == ROUTES:
            CONFIG.gateway_api_served = True
        elif r == GRPC_ROUTES:
            CONFIG.grpc_routes_served = True


async def await_routes(
    have: list[Resource],
    informers_for: Callable[[Resource], list[Informer]],
    started: list[Informer],
    recheck: tuple[float, float] = RECHECK_SECONDS,
    discover: Callable[[], list[Resource]] = served_routes,
) -> None:
    """Until the cluster serves both route kinds: check discovery, and once it serves one that
    HAVE lacks, watch it (INFORMERS_FOR makes its informers; they join STARTED, which start-up's
    cleanup stops) and route the InferenceServices that name a Gateway."""
    missing = [r for r in (ROUTES, GRPC_ROUTES) if r not in have]
    wait, longest = recheck
    while missing:
        await asyncio.sleep(wait)
        wait = min(wait * 2, longest)
        try:
            new = [r for r in await asyncio.to_thread(discover) if r in missing]
        except Exception as e:  # an apiserver restart, a network blip: this task must outlive them
            why = f"API error {e.status}" if isinstance(e, ApiException) else type(e).__name__
            log.info("cannot tell whether the Gateway API is served yet (%s); checking again", why)
            continue
        if not new:
            continue
        informers = [i for r in new for i in informers_for(r)]
        started.extend(informers)
        for informer in informers:
            informer.start()
        while not all(i.synced.is_set() for i in informers):  # a pass must see the routes already made
            await asyncio.sleep(0.2)
        mark_served(new)
        missing = [r for r in missing if r not in new]
        log.info("the cluster serves %s now: watching them", ", ".join(r.kind for r in new))
        for isvc in STORE.list(INFERENCESERVICE):
            if ((isvc.get("spec") or {}).get("canary") or {}).get("gateway"):
                SERVICES.wake(key_of(isvc))
