package main

import (
	"context"
	"fmt"
	"net"

	"github.com/tapsync/tapsync/e2e/testagent"
)

// newSessionServer returns the agent protocol server for host sessions.
func newSessionServer() (sessionServer, error) {
	srv, err := testagent.NewServer()
	if err != nil {
		return nil, fmt.Errorf("create agent server: %w", err)
	}
	srv.SetTimeline(timeline)
	return func(ctx context.Context, conn net.Conn) {
		_ = srv.ServeConn(ctx, conn) // nil or a setup error; either way the session is over
	}, nil
}
