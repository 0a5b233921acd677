"""The InferenceService's HPA metric: CPU utilisation by default, in-flight requests per pod on request."""

from __future__ import annotations

import pydantic
import pytest

from aidc_operator.api.inferenceservice import InferenceServiceSpec
from aidc_operator.builders import inferenceservice as build
from aidc_operator.builders.common import Owner

OWNER = Owner("InferenceService", "mnist", "team-a", "uid-9")


def spec(**replicas: object) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"fromTrainingJob": "mnist"}, "replicas": replicas})


def test_cpu_utilisation_is_the_default_metric() -> None:
    hpa = build.autoscaler(OWNER, spec(min=1, max=3, targetCpuUtilization=50))
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
        }
    ]


def test_inflight_scales_on_the_servers_gauge_per_pod() -> None:
    hpa = build.autoscaler(OWNER, spec(min=1, max=4, metric="inflight", targetInflightRequests=6))
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mnist"}
    # The name the model server exports (server/aidc_server/metrics.py) and the adapter rule serves.
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "aidc_server_requests_in_flight"},
                "target": {"type": "AverageValue", "averageValue": "6"},
            },
        }
    ]


def test_inflight_metric_name_is_what_the_server_exports() -> None:
    from aidc_server.metrics import ServerMetrics

    text = ServerMetrics("m").render().decode()
    assert f"# TYPE {build.INFLIGHT_METRIC} gauge" in text
    assert "# TYPE aidc_server_queue_depth gauge" in text


@pytest.mark.parametrize("bad", [{"metric": "gpu"}, {"metric": "inflight", "targetInflightRequests": 0}])
def test_unknown_metric_or_target_is_refused(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        spec(**bad)
