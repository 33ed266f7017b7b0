// Package testproc owns the processes of tests and the kernel objects a
// test daemon leaves behind: it starts helper processes (QEMU,
// containerd) so that they die with the test binary, even when it is
// killed before its cleanups run, and removes what outlives a daemon
// (processes naming its socket, runc containers, mounts below its
// directory, its cgroups). Test support only.
package testproc

import (
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

// Start starts cmd with SIGKILL as its parent-death signal, from one OS
// thread that lives as long as the process. Pdeathsig fires when the
// thread that forked the child exits, not the process (golang/go#27505),
// and Go ends a thread when a goroutine that locked it returns without
// unlocking, which is how netns code gets rid of a thread it moved into
// another namespace. Forking from such a thread would kill the child
// mid-test; forking from this one cannot. The thread never changes
// namespace either, so the child starts in the process's own.
func Start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	spawner.once.Do(func() {
		spawner.reqs = make(chan request)
		go func() {
			runtime.LockOSThread() // never unlocked, and the goroutine never returns
			for r := range spawner.reqs {
				r.result <- r.cmd.Start()
			}
		}()
	})
	result := make(chan error, 1)
	spawner.reqs <- request{cmd, result}
	return <-result
}

var spawner struct {
	once sync.Once
	reqs chan request
}

type request struct {
	cmd    *exec.Cmd
	result chan error
}
