"""Progress and last-checkpoint reporting from rank 0 to the operator (docs/contracts.md).

In a cluster: merge-patch the pod's own annotations with its ServiceAccount token. Outside one:
write the same objects, keyed by annotation name, to ``<checkpoint dir>/progress.json``.
Reporting runs on a background thread and never blocks or fails training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import urllib.request
from pathlib import Path
from typing import Any

from aidc_trainer.checkpoint import utc_now

log = logging.getLogger("aidc_trainer.progress")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PROGRESS = "aidc.dev/progress"
LAST_CHECKPOINT = "aidc.dev/last-checkpoint"
LAST_BACKUP = "aidc.dev/last-backup"


def evaluation_report(step: int, result: dict[str, Any]) -> dict[str, Any]:
    """The progress report's ``evaluation``: the latest held-out result (null where not computed)."""

    def num(key: str) -> float | None:
        v = result.get(key)
        return round(float(v), 6) if isinstance(v, (int, float)) and math.isfinite(v) else None

    return {"step": step, "loss": num("loss"), "accuracy": num("accuracy"), "f1": num("macro_f1")}


class ProgressReporter:
    def __init__(
        self, checkpoint_dir: str | None, environ: dict[str, str] | None = None, sa_dir: Path = SA_DIR
    ):
        env = dict(os.environ if environ is None else environ)
        self.pod, self.namespace = env.get("AIDC_POD_NAME"), env.get("AIDC_POD_NAMESPACE")
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        # AIDC_SERVICEACCOUNT_DIR: where a non-standard runtime (the development kubelet) put the token.
        self.sa_dir = Path(env["AIDC_SERVICEACCOUNT_DIR"]) if env.get("AIDC_SERVICEACCOUNT_DIR") else sa_dir
        self.in_cluster = bool(self.pod and self.namespace and host and (self.sa_dir / "token").exists())
        if self.in_cluster:
            h = f"[{host}]" if host and ":" in host else host
            self.url = f"https://{h}:{port}/api/v1/namespaces/{self.namespace}/pods/{self.pod}"
        self.file = Path(checkpoint_dir) / "progress.json" if checkpoint_dir else None
        self._state: dict[str, Any] = {}
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="aidc-progress", daemon=True)
        self._thread.start()

    def progress(self, step: int, total: int, **extra: Any) -> None:
        self._update(PROGRESS, {"step": step, "totalSteps": total, "time": utc_now(), **extra})

    def checkpoint(self, step: int, path: str, key_ids: list[str] | None = None) -> None:
        report: dict[str, Any] = {"step": step, "path": path, "time": utc_now()}
        if key_ids is not None:
            report["keyIds"] = key_ids
        self._update(LAST_CHECKPOINT, report)

    def backup(self, step: int, path: str) -> None:
        """The newest checkpoint copied to the backup root (checkpoint_backup)."""
        self._update(LAST_BACKUP, {"step": step, "path": path, "time": utc_now()})

    def _update(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._state[key] = value
        self._dirty.set()

    def close(self) -> None:
        self._stop = True
        self._dirty.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            with self._lock:
                state = dict(self._state)
            if state:
                try:
                    self._send(state)
                except Exception as e:  # report and carry on; the next update retries
                    log.warning("progress report failed: %s", e)
            if self._stop and not self._dirty.is_set():
                return

    def _send(self, state: dict[str, Any]) -> None:
        if self.in_cluster:
            token = (self.sa_dir / "token").read_text().strip()  # re-read: projected tokens rotate
            body = {"metadata": {"annotations": {k: json.dumps(v) for k, v in state.items()}}}
            ctx = ssl.create_default_context(cafile=str(self.sa_dir / "ca.crt"))
            req = urllib.request.Request(
                self.url,
                data=json.dumps(body).encode(),
                method="PATCH",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
            )
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                resp.read()
        elif self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".progress.json.{os.getpid()}")
            tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
            os.replace(tmp, self.file)
