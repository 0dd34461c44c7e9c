#!/usr/bin/env bash
# Build the control plane at Kubernetes $1 (e.g. v1.34.2, the kubelet's version) and etcd $2 (e.g.
# v3.6.16) from the Go module proxy into folder $3: kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy, kubectl and etcd. The folder is written whole or not at all (built in
# $3.tmp, then renamed), so a present folder is a complete one.
#
# Same technique as build-kubelet.sh: a throwaway module that requires k8s.io/kubernetes and points
# every staging module at its published v0.X.Y. etcd's server module has no main package; a module
# of two files (go.mod, main.go over etcdmain.Main) builds it.
set -euo pipefail
version=$1 etcd_version=$2 out=$3
staging_version=v0.${version#v1.}
work=$(mktemp -d)
trap 'rm -rf "$work" "$out.tmp"' EXIT
rm -rf "$out.tmp"
mkdir -p "$out.tmp" "$work/k8s" "$work/etcd"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
log() { echo "build-controlplane: $*" >&2; }

cd "$work/k8s"
go mod init prestop-controlplane-build >/dev/null 2>&1
go mod edit -require "k8s.io/kubernetes@$version"
gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
for module in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace "$module=$module@$staging_version"
done
commands=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl)
{
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for command in "${commands[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$command"; done
    printf ')\n'
} > tools.go
go mod tidy >/dev/null
minor=${version#v1.}
minor=${minor%%.*}
v=k8s.io/component-base/version
ldflags="-s -w -X $v.gitVersion=$version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
for command in "${commands[@]}"; do
    started=$SECONDS
    go build -trimpath -ldflags="$ldflags" -o "$out.tmp/$command" "k8s.io/kubernetes/cmd/$command"
    log "$command $version: $((SECONDS - started)) s"
done

cd "$work/etcd"
go mod init prestop-etcd-build >/dev/null 2>&1
cat > main.go <<'GO'
// etcd's server, as the etcd release binary runs it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
go get "go.etcd.io/etcd/server/v3@$etcd_version" >/dev/null 2>&1
go mod tidy >/dev/null
started=$SECONDS
go build -trimpath -ldflags="-s -w" -o "$out.tmp/etcd" .
log "etcd $etcd_version: $((SECONDS - started)) s"

rm -rf "$out"
mv "$out.tmp" "$out"
