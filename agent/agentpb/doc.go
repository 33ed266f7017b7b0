// Package agentpb holds the wire messages of the Kata agent protocol that
// tapsync speaks: a trimmed copy of Kata's types.proto, agent.proto and
// health.proto (same proto package names, message names and field numbers)
// and the Go code protoc-gen-go generates from it. It has no behaviour of
// its own; agent/ is the only intended user. Regenerate with `make generate`.
package agentpb
