#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go modules pinned beside this script:
#   kubernetes/ (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), etcd/, kwok/, helm/.
# Each lands in $AIDC_CACHE/bin/<component>-<version>/ and is built only once per version, so a fresh
# clone on the same machine reuses it. Prints the path of the bin directory holding links to all of them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${AIDC_CACHE:-$HOME/.cache/aidc}
# The official tarball installs to /usr/local/go; a non-login shell may not have it on PATH.
command -v go >/dev/null || [ ! -x /usr/local/go/bin/go ] || export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || {
  echo "cluster-build: no Go toolchain on PATH; install Go >= 1.26 (https://go.dev/doc/install) and retry" >&2
  exit 1
}
export CGO_ENABLED=0 GOFLAGS=-mod=readonly

# version_of MODULE DIR: the version DIR/go.mod pins for MODULE.
version_of() { (cd "$2" && go list -m -f '{{.Version}}' "$1"); }

log() { echo "cluster-build: $*" >&2; }

# build NAME VERSION DIR LDFLAGS OUTPUT PKG...: go build PKGs in module DIR into the versioned cache dir
# (OUTPUT: "" to name binaries after their packages, else the single binary's name).
build() {
  local name=$1 version=$2 dir=$3 ldflags=$4 output=$5; shift 5
  local out="$cache/bin/$name-$version"
  if [ -f "$out/.complete" ]; then
    log "$name $version: cached in $out"
  else
    log "$name $version: building $* (first time only; kubernetes takes 10-30 min on 2 cores)"
    local t0=$SECONDS
    rm -rf "$out" && mkdir -p "$out"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/$output" "$@") || {
      log "$name: go build failed (see above); check network access to the Go module proxy and disk space"
      exit 1
    }
    touch "$out/.complete"
    log "$name $version: built in $((SECONDS - t0)) s"
  fi
  for f in "$out"/*; do ln -sfn "$f" "$set/$(basename "$f")"; done
}

mkdir -p "$cache/bin"
exec 9>"$cache/bin/.build.lock"
flock 9   # two clones building at once share the result instead of racing

k8s=$(version_of k8s.io/kubernetes "$here/kubernetes")
etcd=$(version_of go.etcd.io/etcd/server/v3 "$here/etcd")
kwok=$(version_of sigs.k8s.io/kwok "$here/kwok")
helm=$(version_of helm.sh/helm/v3 "$here/helm")
minor=${k8s#v1.}; minor=${minor%%.*}
# helm's default Capabilities.KubeVersion (what `helm template`/`lint` assume without --kube-version) is a
# link-time constant, v1.20 unless set: give it the pinned Kubernetes, as helm's own Makefile does from
# client-go. The key names it, so a helm cached without these flags is rebuilt.
helm_key="$helm-k8s1.$minor"
# One directory of links per combination of versions, so clones pinned differently never mix binaries.
set="$cache/bin/set-$(echo "$k8s $etcd $kwok $helm_key" | sha256sum | cut -c1-12)"
mkdir -p "$set"
vpkg=k8s.io/component-base/version
k8s_ldflags="-s -w -X $vpkg.gitVersion=$k8s -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor \
 -X $vpkg.gitTreeState=clean -X $vpkg.gitCommit=aidc-module-build -X $vpkg.buildDate=1970-01-01T00:00:00Z"
build kubernetes "$k8s" "$here/kubernetes" "$k8s_ldflags" "" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl

build etcd "$etcd" "$here/etcd" "-s -w" etcd go.etcd.io/etcd/server/v3
build kwok "$kwok" "$here/kwok" "-s -w" kwok sigs.k8s.io/kwok/cmd/kwok
hpkg=helm.sh/helm/v3
helm_ldflags="-s -w -X $hpkg/internal/version.version=$helm -X $hpkg/internal/version.gitTreeState=clean \
 -X $hpkg/pkg/chartutil.k8sVersionMajor=1 -X $hpkg/pkg/chartutil.k8sVersionMinor=$minor \
 -X $hpkg/pkg/lint/rules.k8sVersionMajor=1 -X $hpkg/pkg/lint/rules.k8sVersionMinor=$minor"
build helm "$helm_key" "$here/helm" "$helm_ldflags" helm $hpkg/cmd/helm

# kwok runs no stages unless given some. Assemble the pinned release's own defaults (what kwokctl
# does): node initialise + lease heartbeat, pod ready/complete/delete.
kwokdir=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
stage="$kwokdir/kustomize/stage"
for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
         pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  echo "---"; cat "$stage/$f.yaml"
done > "$set/kwok-stages.yaml"

echo "$set"
