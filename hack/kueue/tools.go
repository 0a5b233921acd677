//go:build tools

// Package kueue only records the binary hack/cluster/kueue.py builds, so `go mod tidy` keeps the pin.
package kueue

import _ "sigs.k8s.io/kueue/cmd/kueue"
