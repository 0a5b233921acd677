"""A canary with the admission webhooks on, served for real: the mutating webhook gives a canary
without a model name the primary's (the one rule validation also applies), the validating webhook and
the reconciler accept what was stored, and both versions serve under that one name, each from its own
pods run by the development kubelet (hack/cluster/local_kubelet.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.helpers import hostpath_claim
from tests.e2e.test_train_recover_serve import train_into
from tests.kube import Kube, wait_for
from tests.webhooks import operator_with_webhooks

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def _infer(host: str, model: str, meta: dict) -> dict:
    body = {
        "inputs": [
            {"name": meta["inputs"][0]["name"], "shape": [2, 10], "datatype": "FP32", "data": [0.1] * 20}
        ]
    }
    req = urllib.request.Request(
        f"http://{host}:8080/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def test_a_canary_without_a_model_name_is_defaulted_accepted_and_both_versions_serve(
    crds: Kube, tmp_path: Path
) -> None:
    kube = crds
    if kube.local is None:
        pytest.skip("needs the project's local cluster (its development kubelet runs the servers)")
    ns = kube.create_namespace("canary-webhooks", prefix="w")  # not t-*: the session operator's
    state = kube.local.state_dir
    kubelet_log = (state / "logs" / f"kubelet-{ns}.log").open("ab")
    argv = [sys.executable, str(ROOT / "hack" / "cluster" / "local_kubelet.py"), "--state-dir", str(state)]
    kubelet = subprocess.Popen(
        [*argv, "--namespace", ns],
        env={**kube.env(), "PYTHONPATH": f"{ROOT / 'hack' / 'cluster'}:{ROOT / 'operator'}"},
        stdout=kubelet_log,
        stderr=subprocess.STDOUT,
    )
    try:
        with operator_with_webhooks(kube, ns, tmp_path, "aidc-canary") as (_op, port):
            wait_for(
                "the webhook answering",
                lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close() is None,
                timeout=60,
            )
            models = tmp_path / "pv"
            train_into(models / "v1", 5)
            train_into(models / "v2", 7)
            hostpath_claim(kube, ns, "models", models)
            storage = {"volume": {"persistentVolumeClaim": {"claimName": "models"}}, "path": "v1"}
            isvc = {
                "apiVersion": "aidc.dev/v1alpha1",
                "kind": "InferenceService",
                "metadata": {"name": "canaried"},
                "spec": {
                    "model": {"storage": storage, "watchSeconds": 0},
                    "canary": {
                        "trafficPercent": 50,
                        "model": {"storage": {**storage, "path": "v2"}, "watchSeconds": 0},
                    },
                },
            }
            # The apiserver may call the webhook before its configuration propagates: retry the apply.
            wait_for(
                "the InferenceService admitted",
                lambda: (
                    kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc), check=False).returncode
                    == 0
                ),
                timeout=60,
                interval=1,
            )
            stored = kube.get_cr("inferenceservices", ns, "canaried")["spec"]
            assert stored["model"]["name"] == stored["canary"]["model"]["name"] == "canaried"  # defaulted

            def served() -> dict[str, tuple[str, list[str]]] | None:
                """role -> (pod address, versions its server reports), once a server of each role answers."""
                found: dict[str, tuple[str, list[str]]] = {}
                for pod in kube.pods(ns, "aidc.dev/inferenceservice=canaried"):
                    addr = state / "pods" / ns / pod.metadata.name / "address"
                    if not addr.exists():
                        continue
                    host = addr.read_text()
                    if host != pod.status.pod_ip:
                        pytest.skip(
                            "the development kubelet cannot add pod addresses to lo (needs CAP_NET_ADMIN)"
                        )
                    try:
                        meta = _get(f"http://{host}:8080/v2/models/canaried")
                    except OSError:
                        continue
                    found[pod.metadata.labels["aidc.dev/role"]] = (host, meta["versions"])
                return found if set(found) == {"primary", "canary"} else None

            both = wait_for("a serving primary and canary", served, timeout=240, interval=1)
            assert both["primary"][1] == ["5"] and both["canary"][1] == ["7"], both
            for role, version in (("primary", "5"), ("canary", "7")):
                host = both[role][0]
                meta = _get(f"http://{host}:8080/v2/models/canaried")
                out = _infer(host, "canaried", meta)
                assert out["model_name"] == "canaried" and out["model_version"] == version, out

            def ready() -> dict | None:
                st = kube.get_cr("inferenceservices", ns, "canaried").get("status") or {}
                conds = {c["type"]: c for c in st.get("conditions") or []}
                return (
                    st
                    if st.get("phase") == "Ready" and conds.get("CanaryReady", {}).get("status") == "True"
                    else None
                )

            st = wait_for("Ready with the canary ready", ready, timeout=120, interval=1)
            assert not any(c["type"] == "Invalid" and c["status"] == "True" for c in st["conditions"]), st
    finally:
        kube.delete_namespace(ns)
        kubelet.terminate()
        try:
            kubelet.wait(30)
        except subprocess.TimeoutExpired:
            kubelet.kill()
        kubelet_log.close()
        with contextlib.suppress(ApiException):  # absent when the test stopped before making it
            kube.core.delete_persistent_volume(f"{ns}-models")
