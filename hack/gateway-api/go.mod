// Pins the Gateway API (sigs.k8s.io/gateway-api), whose standard-channel CRDs the local cluster installs
// for the tests of weighted canaries (HTTPRoute); hack/cluster/gateway_api.py copies them out of this
// module's download. Nothing here is built.
module aidc.dev/hack/gateway-api

go 1.25.0

require sigs.k8s.io/gateway-api v1.6.3
