"""The Gateway API CRDs (standard channel, sigs.k8s.io/gateway-api pinned in hack/gateway-api/go.mod) for
the local cluster: only the tests of weighted canaries (an HTTPRoute per InferenceService) need them, so
they are installed on demand, not with every cluster start.

The module is fetched with `go mod download` into the Go module cache (the proxy the other builds use);
its config/crd/standard/*.yaml are copied once into $AIDC_CACHE/gateway-api-<version>/ (read-only in
the module cache; keyed by version so a new pin never mixes files). No Gateway controller runs here: the
apiserver stores and validates Gateways and routes, which is what the operator's tests check.

    python hack/cluster/gateway_api.py [--kubeconfig FILE]   # copy the CRDs; with a cluster, install them
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import go_modules
from cluster_processes import ClusterError
from crd_wait import wait_established

ROOT = Path(__file__).resolve().parents[2]
MODULE = "sigs.k8s.io/gateway-api"
PIN = ROOT / "hack" / "gateway-api"  # go.mod/go.sum pinning MODULE
CHANNEL = "standard"
# CRDs the apiserver must report Established before a test may use them.
CRDS = ("gateways", "gatewayclasses", "httproutes", "grpcroutes", "referencegrants")


class GatewayAPIError(ClusterError):
    pass


def crd_dir() -> Path:
    """$AIDC_CACHE/gateway-api-<version>/ holding the standard channel's CRD YAMLs (copied on first use;
    a lock lets two clones share the copy)."""
    env = go_modules.go_env("the Gateway API CRDs (they come from a Go module)", cgo=True)
    go_modules.go(PIN, env, "mod", "download", MODULE)
    version = go_modules.module_field(PIN, env, MODULE, "Version")
    with go_modules.cached("gateway-api", version, under="") as out:
        if not (out / ".complete").exists():
            src = Path(go_modules.module_field(PIN, env, MODULE, "Dir")) / "config" / "crd" / CHANNEL
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            # CRDs only: the channel's ValidatingAdmissionPolicy (safe upgrades) guards clusters that
            # switch channels, which a throwaway test cluster never does.
            for f in sorted(src.glob("gateway.networking.k8s.io_*.yaml")):
                if "_vap_" not in f.name:
                    shutil.copyfile(f, out / f.name)
            (out / ".complete").touch()
        return out


def install(kubectl: list[str]) -> Path:
    """Apply the CRDs with the given kubectl command line (binary and --kubeconfig) and wait until they
    are Established; idempotent."""
    directory = crd_dir()
    args = ["apply", "--server-side", "--force-conflicts", "-f", str(directory)]
    proc = subprocess.run([*kubectl, *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise GatewayAPIError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    wait_established(kubectl, [f"{name}.gateway.networking.k8s.io" for name in CRDS])
    return directory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubeconfig", type=Path, help="install into this cluster (else only copy the CRDs)")
    ap.add_argument("--kubectl", help="kubectl binary (default: the one the local cluster builds)")
    args = ap.parse_args(argv)
    try:
        if args.kubeconfig:
            if args.kubectl is None:
                from localcluster import build_binaries  # cached after the first build

                args.kubectl = str(build_binaries() / "kubectl")
            print(install([args.kubectl, f"--kubeconfig={args.kubeconfig}"]))
        else:
            print(crd_dir())
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
