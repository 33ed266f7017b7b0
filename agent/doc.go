// Package agent is the guest side: the Kata agent client. It speaks the
// agent's ttrpc protocol (grpc.AgentService and grpc.Health) over vsock,
// hybrid vsock or a unix socket, finds the agent through the Kata shim when
// asked to, and converts between tapsync's own Interface, Route and Neighbor
// values (package guestnet's) and the agent's protobuf messages, so that no
// caller sees protobuf.
// It never decides what to configure: reconcile/ does, and hands it the
// complete desired values.
package agent
