"""Waiting for CustomResourceDefinitions to be Established.

`kubectl wait --for=condition=Established` fails at once, instead of waiting, when it reads a CRD whose
status has no conditions yet ("accessor error: <nil> is of the type <nil>"): the moment between the
create and the apiextensions controller's first status write, which a loaded machine stretches. So
the CRDs are polled here, with the same kubectl, until each says Established=True.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterable

from cluster_processes import ClusterError


def established(crds: list[dict]) -> set[str]:
    """Names of the CRDs (as `kubectl get -o json` lists them) whose Established condition is True."""
    return {
        c["metadata"]["name"]
        for c in crds
        if any(
            cond.get("type") == "Established" and cond.get("status") == "True"
            for cond in (c.get("status") or {}).get("conditions") or []
        )
    }


def wait_established(kubectl: list[str], names: Iterable[str], timeout: float = 120) -> None:
    """KUBECTL: the command prefix (binary and --kubeconfig). Raises ClusterError naming the CRDs
    still not Established after TIMEOUT seconds."""
    wanted = sorted(set(names))
    deadline = time.monotonic() + timeout
    missing = wanted
    while True:
        proc = subprocess.run(
            [*kubectl, "get", "crd", *wanted, "-o", "json", "--ignore-not-found"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            doc = json.loads(proc.stdout)  # one name: the object itself; several: a List
            items = doc.get("items") or [] if doc.get("kind") == "List" else [doc]
            missing = sorted(set(wanted) - established(items))
            if not missing:
                return
        if time.monotonic() > deadline:
            why = proc.stderr.strip() if proc.returncode else "not Established"
            raise ClusterError(f"CRDs {', '.join(missing)} after {timeout:.0f}s: {why}")
        time.sleep(0.5)
