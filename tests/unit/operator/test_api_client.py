"""The operator's one API client: every request counted by verb and resource, and held to a QPS/burst."""

from __future__ import annotations

import pytest

from aidc_operator.kubeio import TokenBucket, request_kind


@pytest.mark.parametrize(
    ("method", "url", "expected"),
    [
        ("GET", "https://h/api/v1/namespaces/ns/pods/p", ("get", "pods")),
        ("GET", "https://h/api/v1/namespaces/ns/pods?labelSelector=a", ("list", "pods")),
        ("GET", "https://h/api/v1/pods?watch=true&resourceVersion=5", ("watch", "pods")),
        ("GET", "https://h/api/v1/nodes", ("list", "nodes")),
        ("POST", "https://h/api/v1/namespaces/ns/events", ("create", "events")),
        (
            "PATCH",
            "https://h/apis/aidc.dev/v1alpha1/namespaces/ns/trainingjobs/j/status",
            ("patch", "trainingjobs/status"),
        ),
        ("DELETE", "https://h/api/v1/namespaces/ns/pods/p", ("delete", "pods")),
        ("GET", "https://h/api/v1/namespaces/ns/pods/p:8080/proxy/v2/models/m", ("get", "pods/proxy")),
        (
            "GET",
            "https://h/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
            ("list", "leases"),
        ),
        ("GET", "https://h/api/v1/namespaces/ns", ("get", "namespaces")),
    ],
)
def test_requests_are_named_as_the_apiserver_names_them(method: str, url: str, expected: tuple) -> None:
    assert request_kind(method, url) == expected


def test_token_bucket_allows_a_burst_then_paces_at_qps() -> None:
    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(qps=10, burst=5, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        bucket.acquire()
    assert slept == []  # the burst goes at once
    for _ in range(10):
        bucket.acquire()
    assert sum(slept) == pytest.approx(1.0)  # then 10 more take a second at 10 QPS
    unlimited = TokenBucket(qps=0, burst=1, clock=lambda: 0.0, sleep=sleep)
    for _ in range(100):
        unlimited.acquire()
    assert sum(slept) == pytest.approx(1.0)
