"""Prometheus metrics (served by rank 0) and GPU-seconds accounting."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("aidc_trainer.metrics")


class TrainMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.step = Gauge("aidc_trainer_step", "Last completed optimiser step", registry=r)
        self.total_steps = Gauge("aidc_trainer_total_steps", "Configured total steps", registry=r)
        self.samples_per_second = Gauge("aidc_trainer_samples_per_second", "Global samples/s", registry=r)
        self.step_seconds = Histogram(
            "aidc_trainer_step_seconds",
            "Mean wall time per optimiser step, observed once per log window",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.loss = Gauge(
            "aidc_trainer_loss", "Training loss (mean over ranks at the last log step)", registry=r
        )
        self.eval_accuracy = Gauge("aidc_trainer_eval_accuracy", "Held-out accuracy", registry=r)
        self.eval_macro_f1 = Gauge("aidc_trainer_eval_macro_f1", "Held-out macro-F1", registry=r)
        self.ckpt_save_seconds = Histogram(
            "aidc_trainer_checkpoint_save_seconds",
            "Background time to serialise, encrypt, write and publish a checkpoint",
            registry=r,
        )
        self.ckpt_bytes = Gauge("aidc_trainer_checkpoint_bytes", "Bytes of the last checkpoint", registry=r)
        self.ckpt_stall_seconds = Histogram(
            "aidc_trainer_checkpoint_stall_seconds",
            "Training time blocked per checkpoint (waiting for the previous save + copying state)",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=r,
        )
        self.ckpt_failures = Counter(
            "aidc_trainer_checkpoint_failures", "Checkpoint saves that failed", registry=r
        )
        self.last_ckpt_step = Gauge(
            "aidc_trainer_last_checkpoint_step", "Step of the last checkpoint", registry=r
        )
        self.gpu_seconds = Gauge("aidc_trainer_gpu_seconds", "GPU-seconds used by the job so far", registry=r)
        self.energy_joules = Gauge(
            "aidc_trainer_energy_joules",
            "GPU energy of all GPUs of all ranks since this attempt started (NVML); NaN: not measured",
            registry=r,
        )

    def serve(self, port: int) -> int | None:
        if port < 0:
            return None
        try:
            server, _ = start_http_server(port, registry=self.registry)
            return int(server.server_port)
        except OSError as e:  # metrics must never stop training
            log.warning("metrics endpoint not started on port %d: %s", port, e)
            return None


class Accounting:
    """GPU-seconds for the whole job: wall time x GPUs in the job (energy: aidc_trainer.energy)."""

    def __init__(self, gpus_in_job: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.gpus, self.clock = gpus_in_job, clock
        self.t0 = clock()

    def gpu_seconds(self) -> float:
        return (self.clock() - self.t0) * self.gpus
