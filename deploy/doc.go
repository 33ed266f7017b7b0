// Package deploy holds what installs tapsync on a node — the systemd unit,
// the example config and the Kubernetes DaemonSet — and the tests that
// check them against the types they are read as. It has no code of its
// own: the daemon imports nothing from here.
package deploy
