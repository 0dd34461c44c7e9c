#!/usr/bin/env bash
# Build kubelet $1 (e.g. v1.34.2) from the Go module proxy into $2 (the binary's path).
#
# `go install k8s.io/kubernetes/cmd/kubelet@VERSION` is refused: k8s.io/kubernetes `replace`s its
# staging modules (k8s.io/api, k8s.io/client-go, ...) with ./staging paths. A throwaway module that
# requires k8s.io/kubernetes and points every one of those at its published v0.X.Y builds it.
set -euo pipefail
version=$1 out=$2
staging_version=v0.${version#v1.}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
go mod init prestop-kubelet-build >/dev/null 2>&1
go mod edit -require "k8s.io/kubernetes@$version"
# The staging modules named in that version's own go.mod.
gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
for module in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace "$module=$module@$staging_version"
done
cat > tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kubelet"
GO
go mod tidy >/dev/null
# The version the kubelet reports (and puts in its hooks' user agent, kube-lifecycle/1.34).
minor=${version#v1.}
minor=${minor%%.*}
v=k8s.io/component-base/version
ldflags="-s -w -X $v.gitVersion=$version -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$out.tmp" k8s.io/kubernetes/cmd/kubelet
mv "$out.tmp" "$out"
