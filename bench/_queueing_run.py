"""One mode of bench/queueing.py: the same 200 TrainingJobs, submitted at once into a fresh namespace, run to
the end (or to the cap, or until nothing moves), with the bench playing the kubelet's part of finishing.

Mode "kueue": a ResourceFlavor, a ClusterQueue (nominalQuota = the pool's GPUs, nvidia.com/gpu only) and a
LocalQueue; every job carries kueue.x-k8s.io/queue-name. Mode "fifo": no label, so Kueue ignores the jobs
(manageJobsWithoutQueueName is off) and kube-scheduler places pods first come, first served; aidc's
all-or-nothing timeout (spec.scheduling) is the only guard against partial gangs. Both modes carry the
same spec.scheduling, so the queue label is the only difference between them."""

from __future__ import annotations

import itertools
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _queueing_watch import GPU, JOB_LABEL, Job, RawWatch, Tracker
from _scale_measure import ProcessMeter, percentile
from _scale_ops import Aidc, stop_process
from _scale_run import Bench, say
from kubernetes import client

from cluster_processes import free_port

KQ, KQV = "kueue.x-k8s.io", "v1beta2"
TJ, TJV = "aidc.dev", "v1alpha1"
IMAGE = "aidc-bench/noop:1"  # never pulled: kwok's fake nodes run nothing


@dataclass(frozen=True)
class Settings:
    jobs: int
    seed: int
    pool_gpus: int
    min_duration: int
    max_duration: int
    timeout_seconds: int
    backoff_seconds: int
    cap_seconds: float
    stall_seconds: float
    sample_seconds: float


# Job sizes: a fixed, seeded mix weighted toward small jobs, as on a shared cluster (most jobs are small,
# a few take many nodes). Powers of two, since GPUs per node divide an 8-GPU node that way.
NODES, NODE_WEIGHTS = (1, 2, 4, 8), (45, 30, 15, 10)
GPUS, GPU_WEIGHTS = (1, 2, 4, 8), (35, 30, 20, 15)


def job_mix(s: Settings) -> list[tuple[int, int, int]]:
    """(nodes, GPUs per node, seconds to run) per job; the same list for both modes."""
    r = random.Random(s.seed)
    return [
        (
            r.choices(NODES, NODE_WEIGHTS)[0],
            r.choices(GPUS, GPU_WEIGHTS)[0],
            r.randint(s.min_duration, s.max_duration),
        )
        for _ in range(s.jobs)
    ]


def body(name: str, nodes: int, gpus: int, s: Settings, queue: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if queue:
        meta["labels"] = {f"{KQ}/queue-name": queue}
    spec = {
        "image": IMAGE,
        "command": ["python", "-m", "noop"],
        "nodes": nodes,
        "procPerNode": gpus,  # gpusPerNode defaults to it
        "scheduling": {"timeoutSeconds": s.timeout_seconds, "backoffSeconds": s.backoff_seconds},
    }
    return {"apiVersion": f"{TJ}/{TJV}", "kind": "TrainingJob", "metadata": meta, "spec": spec}


def kueue_objects(tag: str, gpus: int) -> list[tuple[str, dict[str, Any]]]:
    """A flavor with no node labels (the whole schedulable pool) and a ClusterQueue holding exactly the
    pool's GPUs; BestEffortFIFO (the default): a big job that does not fit does not block smaller ones."""
    flavor = {"metadata": {"name": f"pool-{tag}"}, "spec": {}}
    cq = {
        "metadata": {"name": f"cq-{tag}"},
        "spec": {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "resourceGroups": [
                {
                    "coveredResources": [GPU],
                    "flavors": [{"name": f"pool-{tag}", "resources": [{"name": GPU, "nominalQuota": gpus}]}],
                }
            ],
        },
    }
    return [
        ("resourceflavors", {"kind": "ResourceFlavor", **flavor}),
        ("clusterqueues", {"kind": "ClusterQueue", **cq}),
    ]


class Mode:
    def __init__(self, b: Bench, s: Settings, name: str, logs: Path) -> None:
        self.b, self.s, self.name, self.logs = b, s, name, logs
        self.kueue = name == "kueue"
        self.cluster_objects: list[tuple[str, str]] = []

    # set-up -----------------------------------------------------------------------------------------
    def setup_queue(self) -> str | None:
        if not self.kueue:
            return None
        tag = str(int(time.time()))
        for plural, obj in kueue_objects(tag, self.s.pool_gpus):
            self.b.custom.create_cluster_custom_object(KQ, KQV, plural, {"apiVersion": f"{KQ}/{KQV}", **obj})
            self.cluster_objects.append((plural, obj["metadata"]["name"]))
        lq = {
            "apiVersion": f"{KQ}/{KQV}",
            "kind": "LocalQueue",
            "metadata": {"name": "gpu"},
            "spec": {"clusterQueue": f"cq-{tag}"},
        }
        self.b.custom.create_namespaced_custom_object(KQ, KQV, self.b.namespace, "localqueues", lq)

        def active() -> bool:
            cq = self.b.custom.get_cluster_custom_object(KQ, KQV, "clusterqueues", f"cq-{tag}")
            return any(
                c["type"] == "Active" and c["status"] == "True"
                for c in cq.get("status", {}).get("conditions", [])
            )

        deadline = time.time() + 60
        while not active():
            if time.time() > deadline:
                raise RuntimeError("the ClusterQueue did not become Active in 60 s")
            time.sleep(1)
        return "gpu"

    def teardown_queue(self) -> None:
        for plural, name in reversed(self.cluster_objects):
            try:
                self.b.custom.delete_cluster_custom_object(KQ, KQV, plural, name)
            except client.ApiException as e:
                say(f"  could not delete {plural}/{name}: {e.status}")

    # the run ----------------------------------------------------------------------------------------
    def run(self, mix: list[tuple[int, int, int]]) -> dict[str, Any]:
        b, s = self.b, self.s
        say(f"== {self.name}: {len(mix)} jobs on {s.pool_gpus} GPUs")
        b.fresh_namespace()
        queue = self.setup_queue()
        jobs = {f"q-{i:03d}": Job(f"q-{i:03d}", n, g, float(d)) for i, (n, g, d) in enumerate(mix)}
        tr = Tracker(jobs)
        ns = b.namespace
        watches = [
            RawWatch(
                "pods", lambda **kw: b.core.list_namespaced_pod(ns, **kw), tr.on_pod, tr.lock, JOB_LABEL
            ),
            RawWatch(
                "jobs",
                lambda **kw: b.custom.list_namespaced_custom_object(TJ, TJV, ns, "trainingjobs", **kw),
                tr.on_job,
                tr.lock,
            ),
        ]
        if self.kueue:
            watches.append(
                RawWatch(
                    "workloads",
                    lambda **kw: b.custom.list_namespaced_custom_object(KQ, KQV, ns, "workloads", **kw),
                    tr.on_workload,
                    tr.lock,
                    JOB_LABEL,
                )
            )
        proc = Aidc(ns).start(b.c, self.logs / f"aidc-queueing-{self.name}.log", free_port(), free_port())
        meter = ProcessMeter(proc.pid)
        meter.begin("run")
        res: dict[str, Any] = {"mode": self.name, "error": None}
        try:
            for w in watches:
                w.start()
            time.sleep(3)  # the operator's initial lists and watches land before the clock starts
            res |= self._drive(tr, jobs, queue)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            say(f"  FAILED: {res['error']}")
        finally:
            res["operator"] = meter.end("run") | {"vm_hwm_mb": meter.hwm_mb()}
            meter.stop()
            t_clean = time.time()
            for w in watches:  # close all streams first: each join may wait for its read to return
                w.stop(join=False)
            for w in watches:
                w.stop()
            # Delete while the operator still runs: it removes its finalizers, then stops.
            b.custom.delete_collection_namespaced_custom_object(TJ, TJV, ns, "trainingjobs")
            time.sleep(5)
            stop_process(proc)
            b.strip_finalizers(Aidc(ns))
            b.delete_namespace()
            self.teardown_queue()
            say(f"  cleaned up in {time.time() - t_clean:.0f}s")
        return res

    def _drive(self, tr: Tracker, jobs: dict[str, Job], queue: str | None) -> dict[str, Any]:
        b, s = self.b, self.s
        pool = ThreadPoolExecutor(4)  # the kubelet's reports, off the loop that keeps the clock
        t0 = time.time()
        for job in jobs.values():
            job.submitted = t0
        submitted = b.create(
            Aidc(b.namespace), [body(n, j.nodes, j.gpus_per_node, s, queue) for n, j in jobs.items()]
        )
        for name, t in submitted.items():
            jobs[name].submitted = t
        say(f"  {len(jobs)} jobs submitted in {time.time() - t0:.1f}s")
        samples: list[list[float]] = []
        next_sample, last_say, outcome = t0, 0.0, "completed"
        while True:
            now = time.time()
            for name, pods in tr.due(now):
                for pod in pods:
                    pool.submit(self._report_succeeded, name, pod)
            if now >= next_sample:
                held, partial, done, running = tr.sample()
                samples.append([round(now - t0, 2), held, partial, done, running])
                next_sample += s.sample_seconds
                if now - last_say > 30:
                    last_say = now
                    say(
                        f"  {now - t0:5.0f}s: {held}/{s.pool_gpus} GPUs held ({partial} by incomplete gangs);"
                        f" {running} gangs running, {done}/{len(jobs)} done"
                    )
                if done >= len(jobs):
                    break
            if now - t0 > s.cap_seconds:
                outcome = "cap"
                break
            if now - tr.last_progress > s.stall_seconds:
                outcome = "deadlock"
                break
            time.sleep(0.2)
        t_end = time.time()
        tr.close(t_end)
        pool.shutdown(wait=True)
        say(f"  {self.name}: {outcome} after {t_end - t0:.0f}s")
        return self._result(tr, jobs, samples, t0, t_end, outcome)

    def _report_succeeded(self, job: str, pod: str) -> None:
        """What a kubelet writes when the container exits 0 (tests/integration/operator/test_trainingjob.py
        report_exit): phase Succeeded, not Ready, the terminated state."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {
            "exitCode": 0,
            "reason": "Completed",
            "message": "",
            "startedAt": now,
            "finishedAt": now,
        }
        status = {
            "phase": "Succeeded",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "x",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
        try:
            self.b.core.patch_namespaced_pod_status(
                pod, self.b.namespace, {"status": status}, _request_timeout=60
            )
        except client.ApiException as e:
            say(f"  report for {job}/{pod} failed: {e.status} {e.reason}")

    def _result(
        self,
        tr: Tracker,
        jobs: dict[str, Job],
        samples: list[list[float]],
        t0: float,
        t_end: float,
        outcome: str,
    ) -> dict[str, Any]:
        s = self.s
        with tr.lock:
            done = [j for j in jobs.values() if j.succeeded is not None]
            ran = [j for j in jobs.values() if j.all_running is not None]
            admit = [j.admitted if self.kueue else j.first_pod for j in ran]
            adm_lat = [j.all_running - a for j, a in zip(ran, admit, strict=True) if a is not None]
            wait = [j.all_running - j.submitted for j in ran if j.submitted is not None]
            partial = [j for j in jobs.values() if j.partial]
            unfinished = [j for j in jobs.values() if j.succeeded is None]
        retries = self._scheduling_retries()
        # Allocation: the time integral of held GPUs (step function between samples) over capacity x time.
        gpu_s = sum(a[1] * (b[0] - a[0]) for a, b in itertools.pairwise(samples))
        partial_gpu_s = sum(a[2] * (b[0] - a[0]) for a, b in itertools.pairwise(samples))
        span = samples[-1][0] if samples else 0.0
        makespan = max(j.succeeded for j in done) - t0 if len(done) == len(jobs) else None
        work = sum(j.gpus * j.duration for j in done)
        return {
            "outcome": outcome,
            "makespan_s": round(makespan, 1) if makespan is not None else None,
            "elapsed_s": round(t_end - t0, 1),
            "jobs_succeeded": len(done),
            "jobs_failed": sum(j.failed for j in jobs.values()),
            "jobs_ever_all_running": len(ran),
            "unfinished": sorted(f"{j.name} ({j.nodes}x{j.gpus_per_node})" for j in unfinished),
            "allocation_mean": round(gpu_s / (s.pool_gpus * span), 4) if span else None,
            "useful_allocation": round(work / (s.pool_gpus * span), 4) if span else None,
            "gpu_seconds_held": round(gpu_s),
            "gpu_seconds_partial_gangs": round(partial_gpu_s),
            "admission_to_running_p50_s": _r(percentile(adm_lat, 50)),
            "admission_to_running_p99_s": _r(percentile(adm_lat, 99)),
            "admission_to_running_max_s": _r(max(adm_lat, default=None)),
            "submit_to_running_p50_s": _r(percentile(wait, 50)),
            "submit_to_running_p99_s": _r(percentile(wait, 99)),
            "partial_gangs": len(partial),
            # A gang's pods created one by one can show a sibling Unschedulable for a moment; 5 s is more.
            "partial_gangs_5s": sum(j.partial_s >= 5 for j in partial),
            "partial_gang_seconds": round(sum(j.partial_s for j in partial), 1),
            "partial_gang_jobs": sorted(
                f"{j.name} ({j.nodes}x{j.gpus_per_node}, {j.partial_s:.0f}s)" for j in partial
            ),
            "scheduling_timeouts": sum(retries.values()),
            "jobs_timed_out": sum(1 for v in retries.values() if v),
            "deadlocked": outcome == "deadlock",
            # Per job: nodes, GPUs per node, run time, then seconds from t0 (None: never) to its admission
            # (Workload Admitted; without Kueue its first pod), all pods Running and status Succeeded.
            "per_job": {
                j.name: [
                    j.nodes,
                    j.gpus_per_node,
                    j.duration,
                    *(
                        _r(t - t0) if t else None
                        for t in (j.admitted if self.kueue else j.first_pod, j.all_running, j.succeeded)
                    ),
                ]
                for j in jobs.values()
            },
            "samples": samples,  # [t, GPUs held, of those by incomplete gangs, jobs done, gangs running]
        }

    def _scheduling_retries(self) -> dict[str, int]:
        """status.schedulingRetries of every job: how many partial gangs the timeout deleted (one list)."""
        items = self.b.custom.list_namespaced_custom_object(TJ, TJV, self.b.namespace, "trainingjobs")[
            "items"
        ]
        return {
            i["metadata"]["name"]: int((i.get("status") or {}).get("schedulingRetries") or 0) for i in items
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
