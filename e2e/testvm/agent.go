package testvm

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// RestartAgent makes the guest agent exit through its test-only control
// service on TestAgent, and waits until /init has started it again (the
// next MarkerAgentStart). The caller must not hold a connection to
// TestAgent: the socket serves one client at a time. Connections to Agent
// stay open across the restart; a call in flight then may be lost.
func (v *VM) RestartAgent(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Minute)
		defer cancel()
	}
	c, err := v.OpenControl(ctx)
	if err != nil {
		return fmt.Errorf("restart guest agent: %w", err)
	}
	off := v.SerialOffset()
	err = c.c.Call(ctx, control.Service, control.MethodRestart, &emptypb.Empty{}, &emptypb.Empty{})
	c.Close()
	if err != nil {
		return fmt.Errorf("restart guest agent through %s: %w", v.TestAgent, err)
	}
	m, err := v.WaitSerialFrom(ctx, off, AgentExitRE(0))
	if err != nil {
		return fmt.Errorf("restart guest agent: %w", err)
	}
	if _, err := v.WaitSerialFrom(ctx, off, AgentStartRE(atoi(m[1])+1)); err != nil {
		return fmt.Errorf("restart guest agent: %w", err)
	}
	return nil
}

func atoi(s string) int {
	var n int
	fmt.Sscan(s, &n)
	return n
}
