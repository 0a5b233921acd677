"""CRDs count as Established only on a True condition; a fresh CRD's missing status is just 'not yet'."""

from __future__ import annotations

from crd_wait import established


def crd(name: str, status: dict | None) -> dict:
    return {"metadata": {"name": name}, **({"status": status} if status is not None else {})}


def test_only_an_established_true_condition_counts() -> None:
    crds = [
        crd("fresh.example.com", None),  # just created: no status at all
        crd("nulled.example.com", {"conditions": None}),  # what makes `kubectl wait` fail at once
        crd("naming.example.com", {"conditions": [{"type": "NamesAccepted", "status": "True"}]}),
        crd("pending.example.com", {"conditions": [{"type": "Established", "status": "False"}]}),
        crd("ready.example.com", {"conditions": [{"type": "Established", "status": "True"}]}),
    ]
    assert established(crds) == {"ready.example.com"}
