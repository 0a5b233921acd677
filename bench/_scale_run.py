"""One run of bench/scale.py: one operator, N jobs, from an empty namespace back to an empty namespace.

create N jobs -> every pod Running -> settle -> steady-state window -> (aidc) one node lost ->
delete every job -> every pod gone -> operator stopped -> namespace deleted. Times are wall clock
(time.time()) so they line up with the audit log's timestamps."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _scale_measure import AuditLog, ProcessMeter, counter_delta, percentile, total
from _scale_ops import BenchError, Operator, stop_process, wait_until
from _scale_watch import PodWatch
from kubernetes import client

from cluster_processes import free_port
from localcluster import LocalCluster

SETTLE_SECONDS = 10


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    c: LocalCluster
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    audit: AuditLog
    namespace: str
    steady_seconds: float

    # namespace ----------------------------------------------------------------
    def delete_namespace(self, timeout: float = 900) -> None:
        try:
            self.core.delete_namespace(self.namespace)
        except client.ApiException as e:
            if e.status != 404:
                raise
        wait_until(f"namespace {self.namespace} gone", lambda: not self._namespace_exists(), timeout, 2)

    def _namespace_exists(self) -> bool:
        try:
            self.core.read_namespace(self.namespace)
            return True
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise

    def fresh_namespace(self) -> None:
        if self._namespace_exists():
            self.delete_namespace()
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace)))

        def default_sa() -> bool:
            try:
                return bool(self.core.read_namespaced_service_account("default", self.namespace))
            except client.ApiException:
                return False

        wait_until("the namespace's default ServiceAccount", default_sa, 120, 0.5)

    # jobs ---------------------------------------------------------------------
    def create(self, op: Operator, bodies: list[dict[str, Any]], threads: int = 4) -> dict[str, float]:
        """Creates the jobs as fast as `threads` clients can; returns each job's submit time."""

        def one(body: dict[str, Any]) -> tuple[str, float]:
            t = time.time()
            for attempt in range(6):
                try:
                    self.custom.create_namespaced_custom_object(
                        op.group, op.version, self.namespace, op.plural, body, _request_timeout=60
                    )
                    break
                except client.ApiException as e:
                    if e.status == 409:
                        break
                    if (e.status < 429 and e.status != 408) or attempt == 5:
                        raise
                except OSError:
                    if attempt == 5:
                        raise
                time.sleep(1 + attempt)
            return body["metadata"]["name"], t

        with ThreadPoolExecutor(threads) as pool:
            return dict(pool.map(one, bodies))

    def remaining_jobs(self, op: Operator) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(op.group, op.version, self.namespace, op.plural)[
            "items"
        ]

    def strip_finalizers(self, op: Operator) -> None:
        """Cleanup after a failed run: jobs the operator never released."""
        for item in self.remaining_jobs(op):
            if item["metadata"].get("finalizers"):
                self.custom.patch_namespaced_custom_object(
                    op.group, op.version, self.namespace, op.plural, item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )  # fmt: skip


def _progress(watch: PodWatch, names: list[str], t0: float) -> str:
    times = watch.times()
    exist = sum(1 for n in names if (t := times.get(n)) and t.all_exist)
    running = sum(1 for n in names if (t := times.get(n)) and t.all_running)
    elapsed = time.time() - t0
    jobs = len(names)
    return f"{elapsed:6.0f}s: {watch.count()} pods; jobs with all pods {exist}/{jobs}, Running {running}"


def wait_all_running(watch: PodWatch, names: list[str], timeout: float) -> None:
    t0, last = time.time(), 0.0

    def done() -> bool:
        nonlocal last
        times = watch.times()
        if time.time() - last > 15:
            last = time.time()
            say("  " + _progress(watch, names, t0))
        return all((t := times.get(n)) and t.all_running for n in names)

    wait_until(f"{len(names)} jobs all Running", done, timeout)


def node_kill(b: Bench, op: Operator, watch: PodWatch, names: list[str]) -> dict[str, Any]:
    """Kills the agent of a per-node node that hosts job pods; times each affected gang back to all
    Running off that node; checks that no other job's pods changed. Restarts the agent after."""
    candidates = b.c.node_names()

    def on(node: str) -> set[str]:
        return {p.job for p in watch.live() if p.node == node and p.job in names}

    victim = next((n for n in candidates if on(n)), None)
    probe = None
    if victim is None:  # no job landed on a killable node: place one there
        probe = "probe-nodekill"
        b.create(op, [op.job(probe, b.namespace, prefer_nodes=candidates)])
        wait_all_running(watch, [probe], 300)
        names = [*names, probe]
        victim = next((n for n in candidates if on(n)), None)
        if victim is None:
            raise BenchError(f"probe job {probe} did not land on {candidates}")
    affected = sorted(on(victim))
    before = watch.uids()
    say(f"  node kill: {victim} hosts pods of {len(affected)} job(s); stopping its kwok agent")
    t0 = time.time()
    b.c.stop_node_agent(victim)
    recovered: dict[str, float] = {}

    def all_back() -> bool:
        for job in affected:
            if job in recovered:
                continue
            pods = watch.live(job)
            if (
                len(pods) == op.pods_per_job
                and all(p.phase == "Running" and p.node and p.node != victim for p in pods)
            ):  # fmt: skip
                recovered[job] = time.time() - t0
        return len(recovered) == len(affected)

    try:
        wait_until(f"{len(affected)} gang(s) Running off {victim}", all_back, 600, 0.1)
        after = watch.uids()
    finally:
        b.c.start_node_agent(victim)
    new_uids = {j: len(watch.uids().get(j, set()) - before.get(j, set())) for j in affected}
    wait_until(f"{victim} Ready and untainted", lambda: _node_ok(b, victim), 300, 1)
    later = watch.uids()
    touched = sorted(
        j for j in names if j not in affected and not (before.get(j) == after.get(j) == later.get(j))
    )
    times = list(recovered.values())
    return {
        "victim": victim,
        "probe_job": probe,
        "affected_jobs": len(affected),
        "recovery_s": [round(t, 2) for t in times],
        "recovery_max_s": round(max(times), 2),
        "recovery_median_s": round(statistics.median(times), 2),
        "new_pods_per_affected_job": new_uids,
        "other_jobs_untouched": not touched,
        "touched_jobs": touched,
        "node_monitor_grace_period": b.c.node_monitor_grace_period,
    }


def _node_ok(b: Bench, node: str) -> bool:
    n = b.core.read_node(node)
    ready = any(x.type == "Ready" and x.status == "True" for x in n.status.conditions or [])
    return ready and not any(t.key.startswith("node.kubernetes.io/") for t in n.spec.taints or [])


class Phase:
    """A measured stretch of a run: wall-clock window, operator CPU and RSS, its requests in the audit
    log and by its own counter (read at the window's edges)."""

    def __init__(self, b: Bench, op: Operator, meter: ProcessMeter, metrics_port: int, name: str) -> None:
        self.b, self.op, self.meter, self.port, self.name = b, op, meter, metrics_port, name

    def __enter__(self) -> Phase:
        self.c0 = self.op.requests_counter(self.port)
        self.meter.begin(self.name)
        self.t0 = time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1 = time.time()
        self.c1 = self.op.requests_counter(self.port)
        self.stats = self.meter.end(self.name)

    def result(self) -> dict[str, Any]:
        req = self.b.audit.count(self.op.user, self.t0, self.t1)
        return self.stats | {
            "requests": total(req),
            "requests_per_s": round(total(req) / max(self.t1 - self.t0, 1e-9), 3),
            "requests_by": req,
            "counter_by": counter_delta(self.c1, self.c0),
        }


def run_one(b: Bench, op: Operator, n: int, logs: Path, node_kill_test: bool) -> dict[str, Any]:
    """One operator, n jobs. Returns the run's measurements; a failure is recorded in "error" after
    cleaning up (the caller moves on to the next run)."""
    res: dict[str, Any] = {"operator": op.name, "size": n, "pods": n * op.pods_per_job, "error": None}
    say(f"== {op.name}, {n} jobs x {op.pods_per_job} pods")
    b.fresh_namespace()
    mport = free_port()
    t_op0 = time.time()
    proc = op.start(b.c, logs / f"{op.name}-{n}.log", mport, free_port())
    meter = ProcessMeter(proc.pid)
    meter.begin("overall")
    watch = PodWatch(b.core, b.namespace, op.job_label, op.pods_per_job)
    names = [f"{'tj' if op.name == 'aidc' else 'pt'}-{i:04d}" for i in range(n)]
    try:
        watch.start()
        time.sleep(3)  # the operator's initial lists and watches land before the clock starts
        with Phase(b, op, meter, mport, "create") as ph:
            submitted = b.create(op, [op.job(name, b.namespace) for name in names])
            say(f"  {n} jobs created in {time.time() - ph.t0:.1f}s")
            wait_all_running(watch, names, 300 + 3 * n)
        times = watch.times()
        first = min(submitted.values())
        latencies = [times[j].all_running - submitted[j] for j in names]
        res["create"] = {
            "jobs_submitted_s": round(max(submitted.values()) - first, 2),
            "all_pods_created_s": round(max(times[j].all_exist for j in names) - first, 2),
            "all_running_s": round(max(times[j].all_running for j in names) - first, 2),
            "job_latency_p50_s": round(percentile(latencies, 50), 2),
            "job_latency_p99_s": round(percentile(latencies, 99), 2),
            **ph.result(),
        }
        say(f"  all {res['pods']} pods Running {res['create']['all_running_s']}s after the first create")
        # The steady window starts only once the operator has caught up: every job's own status says
        # Running (a backlog of status writes is not steady state).
        wait_until(
            "every job's status Running",
            lambda: sum(op.reports_running(j) for j in b.remaining_jobs(op)) >= n,
            timeout=300 + 3 * n,
            interval=2.0,
        )
        res["create"]["status_running_s"] = round(time.time() - first, 2)
        say(f"  every job's status Running {res['create']['status_running_s']}s after the first create")

        time.sleep(SETTLE_SECONDS)
        with Phase(b, op, meter, mport, "steady") as ph:
            time.sleep(b.steady_seconds)
        res["steady"] = ph.result()
        say(f"  steady: {res['steady']['requests_per_s']} requests/s, {res['steady']['cpu_per_s']} CPU s/s")

        if node_kill_test:
            with Phase(b, op, meter, mport, "node_kill") as ph:
                nk = node_kill(b, op, watch, names)
            res["node_kill"] = nk | ph.result()
            back, untouched = nk["recovery_max_s"], nk["other_jobs_untouched"]
            say(f"  node kill: gang(s) back in {back}s (max); other jobs untouched: {untouched}")

        with Phase(b, op, meter, mport, "delete") as ph:
            b.custom.delete_collection_namespaced_custom_object(op.group, op.version, b.namespace, op.plural)
            wait_until("every pod gone", lambda: watch.count() == 0, 300 + 2 * n)
            t_pods = time.time()
            wait_until("every job gone", lambda: not b.remaining_jobs(op), 300 + n, 2)
        res["delete"] = ph.result() | {
            "pods_gone_s": round(t_pods - ph.t0, 2),
            "jobs_gone_s": round(ph.t1 - ph.t0, 2),
        }
        say(f"  deleted: pods gone in {res['delete']['pods_gone_s']}s")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop what we started, leave the rest to cluster.down()
        res["error"] = "interrupted"
        raise
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        say(f"  FAILED: {res['error']}")
        say("  " + _progress(watch, names, t_op0))
    finally:
        _finish(b, op, res, proc, meter, watch, t_op0)
    return res


def _finish(
    b: Bench,
    op: Operator,
    res: dict[str, Any],
    proc: subprocess.Popen[bytes],
    meter: ProcessMeter,
    watch: PodWatch,
    t_op0: float,
) -> None:
    """Stops the operator (after it released what a failed run left), records the whole run and empties
    the namespace for the next run."""
    interrupted = res["error"] == "interrupted"
    try:
        if res["error"] and not interrupted:  # leave nothing behind for the next run
            b.custom.delete_collection_namespaced_custom_object(op.group, op.version, b.namespace, op.plural)
            time.sleep(5)
    finally:
        overall = meter.end("overall") | {"vm_hwm_mb": meter.hwm_mb()}
        stop_process(proc)
        t_op1 = time.time()
        meter.stop()
        watch.stop()
    if interrupted:
        return
    req = b.audit.count(op.user, t_op0, t_op1)
    res["overall"] = overall | {"requests": total(req), "requests_by": req}
    # The node kill is aidc's alone: the whole-run totals also without it, to compare like with like.
    nk = res.get("node_kill") or {}
    res["overall"]["cpu_s_without_node_kill"] = round(overall["cpu_s"] - nk.get("cpu_s", 0), 2)
    res["overall"]["requests_without_node_kill"] = total(req) - (nk.get("requests") or 0)
    if res["error"]:
        b.strip_finalizers(op)
    b.delete_namespace()
    return res


def dump(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
