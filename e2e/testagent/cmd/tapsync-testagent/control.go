package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"

	"github.com/containerd/ttrpc"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/tapsync/tapsync/e2e/testagent/control"
)

// restart is signalled by a Restart call; main then exits.
var restart = make(chan struct{}, 1)

// maxControlFrame bounds the requests looked into for the control
// service; its requests are a few dozen bytes.
const maxControlFrame = 4096

// frameTypeResponse is ttrpc's message type of a reply.
const frameTypeResponse = 2

// controlCalls are the control service's methods that take and answer
// JSON, each answered from its own goroutine: the traffic tools and the
// measuring methods.
var controlCalls = func() map[string]func([]byte) (any, error) {
	m := map[string]func([]byte) (any, error){}
	for _, calls := range []map[string]func([]byte) (any, error){trafficMethods, measureMethods} {
		for k, v := range calls {
			m[k] = v
		}
	}
	return m
}()

// control answers a request for the control service itself, so that the
// agent library (e2e/testagent, which registers only the agent's own
// services) needs no hook for it. The message at the head of s.r, of
// size payload bytes on stream id, is a request; control reports whether it
// was for the control service and so consumed.
//
// Restart is answered at once. The JSON methods (controlCalls) may run
// for seconds, so they are answered from their own goroutine while the
// session goes on reading; a reply that finishes after its session ended
// is dropped.
func (s *stream) control(id uint32, size int) (bool, error) {
	if size > maxControlFrame {
		return false, nil
	}
	msg, err := s.r.Peek(frameHeaderLen + size)
	if err != nil {
		return false, nil // let the session's own read report it
	}
	var req ttrpc.Request
	if proto.Unmarshal(msg[frameHeaderLen:], &req) != nil || req.Service != control.Service {
		return false, nil
	}
	if _, err := s.r.Discard(len(msg)); err != nil {
		return true, err
	}
	if h, ok := s.calls[req.Method]; ok {
		gen := s.gen.Load()
		go func() {
			resp := trafficCall(req.Method, h, req.Payload)
			if err := s.respond(gen, id, resp); err != nil {
				logf("%v", err)
			}
		}()
		return true, nil
	}
	resp := &ttrpc.Response{}
	switch req.Method {
	case control.MethodRestart:
		payload, _ := proto.Marshal(&emptypb.Empty{})
		resp.Payload = payload
	default:
		resp.Status = &spb.Status{Code: int32(codes.Unimplemented), Message: fmt.Sprintf("%s/%s", control.Service, req.Method)}
	}
	if err := s.respond(s.gen.Load(), id, resp); err != nil {
		return true, err
	}
	if req.Method == control.MethodRestart {
		select {
		case restart <- struct{}{}:
		default: // already asked
		}
	}
	return true, nil
}

// respond writes resp as the reply on stream id of session gen, unless
// another session has begun since: its client numbers its streams afresh
// and would take the reply for one of its own.
func (s *stream) respond(gen uint64, id uint32, resp *ttrpc.Response) error {
	body, err := proto.Marshal(resp)
	if err != nil {
		return err
	}
	frame := make([]byte, frameHeaderLen, frameHeaderLen+len(body))
	binary.BigEndian.PutUint32(frame[0:4], uint32(len(body)))
	binary.BigEndian.PutUint32(frame[4:8], id)
	frame[8] = frameTypeResponse
	frame = append(frame, body...)
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.gen.Load() != gen {
		return nil
	}
	if _, err := s.f.Write(frame); err != nil {
		return fmt.Errorf("answer %s on stream %d: %w", control.Service, id, err)
	}
	return nil
}

// trafficCall runs one traffic method: the request is JSON in a
// BytesValue, and so is the reply; a failure is a status with the error's
// text.
func trafficCall(method string, h func([]byte) (any, error), payload []byte) *ttrpc.Response {
	fail := func(code codes.Code, err error) *ttrpc.Response {
		return &ttrpc.Response{Status: &spb.Status{Code: int32(code), Message: fmt.Sprintf("%s/%s: %v", control.Service, method, err)}}
	}
	var in wrapperspb.BytesValue
	if err := proto.Unmarshal(payload, &in); err != nil {
		return fail(codes.InvalidArgument, err)
	}
	out, err := h(in.Value)
	if err != nil {
		return fail(codes.Unknown, err)
	}
	b, err := json.Marshal(out)
	if err != nil {
		return fail(codes.Internal, err)
	}
	body, err := proto.Marshal(wrapperspb.Bytes(b))
	if err != nil {
		return fail(codes.Internal, err)
	}
	return &ttrpc.Response{Payload: body}
}
