//go:build tools

// Package peers only records the binary bench/peers/build.sh builds, so `go mod tidy` keeps the pin.
package peers

import _ "github.com/kubeflow/training-operator/cmd/training-operator.v1"
