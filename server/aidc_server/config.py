"""Command line and environment (AIDC_*) settings; a flag wins over its variable."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from aidc_trainer.model_registry import parse_allowlist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    checkpoint_dir: str
    model_name: str
    key_dir: str | None = None
    kek_file: str | None = None
    model_factories: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int = 8081
    max_batch_size: int = 32
    max_latency_ms: float = 5.0
    max_request_bytes: int = 64 * 1024 * 1024
    quantize: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    watch_seconds: float = 0.0
    retry_seconds: float = 5.0
    drain_seconds: float = 2.0
    drain_timeout_seconds: float = 30.0
    torch_threads: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "info"


# flag -> (env variable, type, help)
_OPTIONS: dict[str, tuple[str, type, str]] = {
    "checkpoint-dir": ("AIDC_CHECKPOINT_DIR", str, "checkpoint root (step-NNNNNNNNN/ directories)"),
    "model-name": ("AIDC_MODEL_NAME", str, "name the model is served under (/v2/models/NAME)"),
    "key-dir": ("AIDC_KEY_DIR", str, "mounted key Secret (current-key-id, key-<id>); absent: unencrypted"),
    "kek-file": ("AIDC_KEK_FILE", str, "KEK that wraps the keys in --key-dir"),
    "model-factories": (
        "AIDC_MODEL_FACTORIES",
        str,
        "comma-separated module:function model factories to trust besides the built-in examples and "
        "installed 'aidc.models' entry points",
    ),
    "host": ("AIDC_HOST", str, "address to listen on"),
    "port": ("AIDC_PORT", int, "HTTP port"),
    "grpc-port": ("AIDC_GRPC_PORT", int, "gRPC port (Open Inference Protocol v2; 0: no gRPC)"),
    "max-batch-size": ("AIDC_MAX_BATCH_SIZE", int, "most rows per forward pass"),
    "max-latency-ms": ("AIDC_MAX_LATENCY_MS", float, "longest a request waits for batch-mates"),
    "max-request-bytes": ("AIDC_MAX_REQUEST_BYTES", int, "largest accepted request body (413 above)"),
    "quantize": ("AIDC_QUANTIZE", str, "int8: dynamic int8 quantization of Linear layers (CPU only)"),
    "device": ("AIDC_DEVICE", str, "auto (the GPU when CUDA sees one), cpu or cuda"),
    "precision": ("AIDC_PRECISION", str, "fp32, bf16 or fp16: weights and float inputs cast for inference"),
    "watch-seconds": ("AIDC_WATCH_SECONDS", float, "poll for a newer checkpoint and hot swap (0: off)"),
    "retry-seconds": ("AIDC_RETRY_SECONDS", float, "retry interval while no checkpoint could be loaded"),
    "drain-seconds": ("AIDC_DRAIN_SECONDS", float, "on SIGTERM: keep serving, not ready, this long"),
    "drain-timeout-seconds": ("AIDC_DRAIN_TIMEOUT_SECONDS", float, "then wait at most this for in-flight"),
    "torch-threads": ("AIDC_TORCH_THREADS", int, "torch intra-op threads (0: torch's default)"),
    "tls-cert": ("AIDC_TLS_CERT", str, "PEM certificate: serve HTTPS"),
    "tls-key": ("AIDC_TLS_KEY", str, "PEM private key for --tls-cert"),
    "log-level": ("AIDC_LOG_LEVEL", str, "debug, info, warning, error"),
}
_REQUIRED = ("checkpoint-dir", "model-name")
# The request limit's names before it covered gRPC messages too: still read, with a warning, so an
# upgrade does not quietly drop a configured limit back to the default (the flag: --max-body-bytes).
_RENAMED_VARS = {"AIDC_MAX_REQUEST_BYTES": "AIDC_MAX_BODY_BYTES"}


def parse_args(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    defaults = Settings(checkpoint_dir="", model_name="")
    parser = argparse.ArgumentParser(
        prog="python -m aidc_server", description="aidc model server (Open Inference Protocol v2)"
    )
    for flag, (var, kind, text) in _OPTIONS.items():
        attr = flag.replace("-", "_")
        default = getattr(defaults, attr)
        source = var if env.get(var) else _RENAMED_VARS.get(var, var)
        if env.get(source):
            if source != var:
                log.warning("%s is now %s", source, var)
            try:
                default = kind(env[source])
            except ValueError:
                parser.error(f"{source}={env[source]!r} is not a valid {kind.__name__}")
        parser.add_argument(
            f"--{flag}", type=kind, default=default, help=f"{text} [env {var}; default {default!r}]"
        )
    parser.add_argument("--max-body-bytes", dest="legacy_max_body_bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    legacy = args.__dict__.pop("legacy_max_body_bytes")
    if legacy is not None:
        log.warning("--max-body-bytes is now --max-request-bytes")
        # The new flag or variable wins when both names are set.
        if args.max_request_bytes == parser.get_default("max_request_bytes") and not env.get(
            "AIDC_MAX_REQUEST_BYTES"
        ):
            args.max_request_bytes = legacy
    for flag in _REQUIRED:
        if not getattr(args, flag.replace("-", "_")):
            parser.error(f"--{flag} (or {_OPTIONS[flag][0]}) is required")
    if args.quantize in ("", "none"):
        args.quantize = None
    if args.quantize not in (None, "int8"):
        parser.error(f"--quantize must be int8 or none, not {args.quantize!r}")
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda, not {args.device!r}")
    if args.precision not in ("fp32", "bf16", "fp16"):
        parser.error(f"--precision must be fp32, bf16 or fp16, not {args.precision!r}")
    if args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be >= 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        parse_allowlist(args.model_factories)
    except ValueError as e:
        parser.error(f"--model-factories: {e}")
    if not 0 <= args.grpc_port <= 65535:
        parser.error("--grpc-port must be between 0 (off) and 65535")
    if args.grpc_port and args.grpc_port == args.port:
        parser.error(f"--grpc-port and --port are both {args.port}; give gRPC another port or 0 (off)")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be >= 1")
    return Settings(**vars(args))
