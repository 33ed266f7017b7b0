package main

import (
	"encoding/binary"
	"fmt"

	"github.com/containerd/ttrpc"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
)

// The test-only control service. e2e/testvm's RestartAgent spells the same
// names; its restart test fails if the two drift apart.
const (
	controlService = "tapsync.testagent.Control"
	restartMethod  = "Restart"
)

// restart is signalled by a Restart call; main then exits.
var restart = make(chan struct{}, 1)

// maxControlFrame bounds the requests looked into for the control
// service; a Restart request is a few dozen bytes.
const maxControlFrame = 4096

// frameTypeResponse is ttrpc's message type of a reply.
const frameTypeResponse = 2

// control answers a request for the control service itself, so that the
// agent library (e2e/testagent, which registers only the agent's own
// services) needs no hook for it. The message at the head of s.r, of
// size payload bytes on stream id, is a request; control reports whether it
// was for the control service and so consumed and answered.
func (s *stream) control(id uint32, size int) (bool, error) {
	if size > maxControlFrame {
		return false, nil
	}
	msg, err := s.r.Peek(frameHeaderLen + size)
	if err != nil {
		return false, nil // let the session's own read report it
	}
	var req ttrpc.Request
	if proto.Unmarshal(msg[frameHeaderLen:], &req) != nil || req.Service != controlService {
		return false, nil
	}
	if _, err := s.r.Discard(len(msg)); err != nil {
		return true, err
	}
	resp := &ttrpc.Response{}
	switch req.Method {
	case restartMethod:
		payload, _ := proto.Marshal(&emptypb.Empty{})
		resp.Payload = payload
	default:
		resp.Status = &spb.Status{Code: int32(codes.Unimplemented), Message: fmt.Sprintf("%s/%s", controlService, req.Method)}
	}
	body, err := proto.Marshal(resp)
	if err != nil {
		return true, err
	}
	frame := make([]byte, frameHeaderLen, frameHeaderLen+len(body))
	binary.BigEndian.PutUint32(frame[0:4], uint32(len(body)))
	binary.BigEndian.PutUint32(frame[4:8], id)
	frame[8] = frameTypeResponse
	frame = append(frame, body...)
	s.wmu.Lock()
	_, err = s.f.Write(frame)
	s.wmu.Unlock()
	if err != nil {
		return true, fmt.Errorf("answer %s/%s: %w", controlService, req.Method, err)
	}
	if req.Method == restartMethod {
		select {
		case restart <- struct{}{}:
		default: // already asked
		}
	}
	return true, nil
}
