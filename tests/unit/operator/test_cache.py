"""The watch-fed store: what passes read, which changes wake anybody, and that our own writes coming
back through the watch (or arriving late) never undo what the cluster said."""

from __future__ import annotations

from aidc_operator.cache import NODE, POD, Store


def pod(name: str, rv: int, job: str = "j", node: str | None = "n1", ns: str = "ns", **meta: object) -> dict:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "resourceVersion": str(rv),
            "labels": {"aidc.dev/job-name": job},
            "managedFields": [{"manager": "kube-scheduler"}],
            **meta,
        },
        "spec": {"nodeName": node},
        "status": {"phase": "Running"},
    }


def node(name: str, rv: int, ready: str = "True", heartbeat: str = "t0") -> dict:
    return {
        "metadata": {"name": name, "resourceVersion": str(rv), "labels": {"big": "x" * 100}},
        "spec": {},
        "status": {
            "conditions": [
                {"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat},
                {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat},
            ],
            "images": [{"names": ["a"] * 50}],
        },
    }


def recorder(store: Store) -> list[tuple[str, str | None, str | None]]:
    seen: list[tuple[str, str | None, str | None]] = []
    store.subscribe(
        lambda kind, old, new: seen.append(
            (kind, old and old["metadata"]["resourceVersion"], new and new["metadata"]["resourceVersion"])
        )
    )
    return seen


def test_pods_are_indexed_by_job_and_node_and_reindexed_when_they_move() -> None:
    s = Store()
    s.upsert(POD, pod("a", 1, job="j1", node=None))
    s.upsert(POD, pod("b", 2, job="j1", node="n2"))
    s.upsert(POD, pod("c", 3, job="j2", node="n2", ns="other"))
    assert {p["metadata"]["name"] for p in s.pods_with("aidc.dev/job-name", "ns", "j1")} == {"a", "b"}
    assert s.owners_on_node("n2", "aidc.dev/job-name") == {("ns", "j1"), ("other", "j2")}
    s.upsert(POD, pod("a", 4, job="j1", node="n1"))  # scheduled
    assert s.owners_on_node("n1", "aidc.dev/job-name") == {("ns", "j1")}
    s.delete(POD, pod("b", 5, job="j1", node="n2"))
    assert s.owners_on_node("n2", "aidc.dev/job-name") == {("other", "j2")}
    assert "managedFields" not in s.get(POD, "ns", "a")["metadata"]  # not kept in memory


def test_an_older_or_repeated_version_changes_nothing_and_wakes_nobody() -> None:
    s = Store()
    seen = recorder(s)
    assert s.upsert(POD, pod("a", 5))
    assert not s.upsert(POD, pod("a", 5))  # our write's answer, then the same through the watch
    assert not s.upsert(POD, pod("a", 4))  # a late event from before our write
    assert s.get(POD, "ns", "a")["metadata"]["resourceVersion"] == "5"
    assert seen == [(POD, None, "5")]


def test_a_late_write_through_cannot_revive_a_deleted_object() -> None:
    s = Store()
    s.upsert(POD, pod("a", 5))
    s.delete(POD, pod("a", 9))  # the watch saw it go (its final version)
    assert not s.upsert(POD, pod("a", 7, deletionTimestamp="now"))  # our delete call's answer, late
    assert s.get(POD, "ns", "a") is None
    assert s.upsert(POD, pod("a", 12))  # a new pod of the same name is a new object
    assert s.get(POD, "ns", "a") is not None


def test_node_heartbeats_are_trimmed_away_so_only_health_changes_notify() -> None:
    s = Store()
    seen = recorder(s)
    s.upsert(NODE, node("n1", 1))
    s.upsert(NODE, node("n1", 2, heartbeat="t1"))  # a heartbeat: same health
    s.upsert(NODE, node("n1", 3, ready="Unknown", heartbeat="t2"))
    assert seen == [(NODE, None, "1"), (NODE, "2", "3")]
    kept = s.get(NODE, "", "n1")
    assert "images" not in kept["status"] and "labels" not in kept["metadata"]
    assert kept["status"]["conditions"] == [{"type": "Ready", "status": "Unknown"}]


def test_relist_removes_what_the_cluster_no_longer_has_within_its_scope() -> None:
    s = Store()
    s.upsert(POD, pod("a", 1))
    s.upsert(POD, pod("b", 2))
    s.upsert(POD, pod("c", 3, ns="elsewhere"))
    s.replace(POD, [pod("b", 4)], lambda key: key[0] == "ns")
    names = {p["metadata"]["name"] for p in s.list(POD)}
    assert names == {"b", "c"}  # c is another informer's scope


def test_node_health_view_reads_only_the_nodes_asked_and_uses_the_lease_clock() -> None:
    t = [100.0]
    s = Store(clock=lambda: t[0])
    s.upsert(NODE, node("n1", 1))
    s.upsert(NODE, node("n2", 2, ready="False"))
    lease = {
        "metadata": {"name": "n1", "namespace": "kube-node-lease", "resourceVersion": "3"},
        "spec": {"renewTime": "2020-01-01T00:00:00.000000Z", "leaseDurationSeconds": 10},
    }
    s.upsert("Lease", lease)
    health = s.health()
    assert health["n1"].healthy and not health["n2"].healthy
    assert health.get("gone") is None and len(health) == 2
    t[0] = 111.0  # renewTime unchanged for 11 s on our clock (the wall-clock value is years old)
    assert s.health()["n1"].reason == "NodeLeaseExpired"
    s.upsert(
        "Lease",
        {
            **lease,
            "metadata": {**lease["metadata"], "resourceVersion": "4"},
            "spec": {**lease["spec"], "renewTime": "2020-01-01T00:00:10.000000Z"},
        },
    )
    assert s.health()["n1"].healthy
