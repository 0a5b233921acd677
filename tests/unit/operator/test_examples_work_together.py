"""The shipped examples work as a set: an InferenceService example that serves a TrainingJob names a job
that is itself an example, and that job writes its checkpoints to a claim the model servers can mount
(shipped beside it, readable from many nodes), so applying the pair can end Ready."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aidc_operator.admission import default_trainingjob
from aidc_operator.builders.inferenceservice import resolve_training_job

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
SHARED = {"ReadWriteMany", "ReadOnlyMany"}  # servers run on other nodes than the trainer


def docs(kind: str) -> dict[str, tuple[str, dict]]:
    """name → (file, document) of every top-level example of the kind (GitOps and Kueue trees have
    their own tests)."""
    found = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == kind:
                found[doc["metadata"]["name"]] = (path.name, doc)
    return found


def served_jobs() -> list[tuple[str, str]]:
    return [
        (f"{file}:{name}", doc["spec"]["model"]["fromTrainingJob"])
        for name, (file, doc) in docs("InferenceService").items()
        if doc["spec"]["model"].get("fromTrainingJob")
    ]


def test_an_example_serves_a_training_job() -> None:
    assert served_jobs()


@pytest.mark.parametrize("where,job", served_jobs(), ids=[w for w, _ in served_jobs()])
def test_the_served_job_is_an_example_with_a_volume_the_servers_can_mount(where: str, job: str) -> None:
    jobs = docs("TrainingJob")
    assert job in jobs, f"{where} serves TrainingJob {job!r}, which no example defines"
    file, doc = jobs[job]
    spec = default_trainingjob(doc["spec"])
    # What the operator does with it: an emptyDir would be TrainingJobHasNoCheckpointVolume.
    applied = {**doc, "metadata": {**doc["metadata"], "namespace": "ns", "uid": "u"}, "spec": spec}
    model = resolve_training_job(applied)
    claim = (model.volume.get("persistentVolumeClaim") or {}).get("claimName")
    if claim is None:
        return  # an inline shared volume (NFS …): nothing more to ship
    claims = docs("PersistentVolumeClaim")
    assert claim in claims, f"{file}: claim {claim!r} is not shipped in examples/"
    modes = set(claims[claim][1]["spec"].get("accessModes") or [])
    assert modes & SHARED, f"claim {claim!r} is {sorted(modes)}: model servers on other nodes cannot mount it"


def test_the_local_volume_example_fits_the_shipped_claims() -> None:
    """examples/local-checkpoints-pv.yaml is what a cluster with no provisioner binds the claims to."""
    volumes = docs("PersistentVolume")
    assert volumes
    for name, (_, pvc) in docs("PersistentVolumeClaim").items():
        if "storageClassName" in pvc["spec"]:
            continue  # names a class: the local volume is not for it
        modes = set(pvc["spec"]["accessModes"])
        fits = [
            pv
            for _, pv in volumes.values()
            if pv["spec"].get("storageClassName") == "" and modes <= set(pv["spec"]["accessModes"])
        ]
        assert fits, f"no example PersistentVolume binds claim {name!r}"
