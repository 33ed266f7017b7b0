// Package e2e holds tapsync's end-to-end tests: real network namespaces,
// real taps and tc in the kernel, a real QEMU with a real Linux guest. The
// tests sit behind the "e2e" build tag and need root; `make test` runs
// them. Fixtures live in e2e/testnet (namespaces, links) and e2e/testvm
// (the guest image and QEMU).
package e2e
