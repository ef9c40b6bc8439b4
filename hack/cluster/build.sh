#!/usr/bin/env bash
# Builds a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl as one multi-call binary; etcd; helm; kwok) from the Go
# module proxy, cached by version outside the checkout. Idempotent: a second run with
# the same versions does nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=${K8S_VERSION:-v1.35.4}
HELM_VERSION=${HELM_VERSION:-v3.19.5}
KWOK_VERSION=${KWOK_VERSION:-v0.7.0}
CACHE=${KUBELOOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeloop}
bin="$CACHE/k8s-$K8S_VERSION/bin"
tools="$CACHE/tools"
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

log() { printf '[build] %s\n' "$*" >&2; }

build_control_plane() {
  if [[ -x "$bin/kube" && -x "$bin/etcd" ]]; then
    log "control plane $K8S_VERSION cached in $bin"
    return
  fi
  local work="$CACHE/build/k8s-$K8S_VERSION"
  mkdir -p "$work" "$bin"
  rm -rf "$work/cmd" && cp -r "$here/cmd" "$work/cmd"

  log "reading k8s.io/kubernetes@$K8S_VERSION go.mod"
  local gomod
  gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # kubernetes requires its staging modules at v0.0.0 and replaces them with
  # ./staging paths; outside its tree each maps to the published v0.<minor>.<patch>.
  local staging="v0${K8S_VERSION#v1}"
  {
    echo "module kubeloop.dev/hack/cluster"
    echo
    echo "go $(awk '$1=="go"{print $2; exit}' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print "\t" $1 " => " $1 " '"$staging"'"}' "$gomod" | sort -u
    echo ")"
  } >"$work/go.mod"
  log "$(grep -c '=>' "$work/go.mod") staging modules replaced with $staging"

  (cd "$work" && go mod tidy)
  local v="k8s.io/component-base/version" c="k8s.io/client-go/pkg/version"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ldflags="-s -w"
  for pkg in $v $c; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  log "compiling (first time only: ~15 min on 2 cores)"
  (cd "$work" && go build -trimpath -ldflags "$ldflags" -o "$bin/kube" ./cmd/kube)
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" ./cmd/etcd)
  for name in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    ln -sf kube "$bin/$name"
  done
  log "control plane $K8S_VERSION built in $bin"
}

go_tool() { # name module-path version
  local name=$1 pkg=$2 version=$3 dest="$tools/$1-$3"
  if [[ -x "$dest/$name" ]]; then
    log "$name $version cached"
  else
    log "building $name $version"
    mkdir -p "$dest"
    GOBIN="$dest" go install -trimpath -ldflags "-s -w" "$pkg@$version"
  fi
  ln -sf "$dest/$name" "$bin/$name"
}

build_control_plane
go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
if [[ "${WITH_KWOK:-1}" == 1 ]]; then
  go_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
fi
echo "$bin"
