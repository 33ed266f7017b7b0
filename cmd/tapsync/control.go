package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/tapsync/tapsync/reconcile"
	"github.com/tapsync/tapsync/state"
	"github.com/tapsync/tapsync/watcher"
	"golang.org/x/sys/unix"
)

// The control socket lives in the state directory, mode 0600, and only
// accepts peers running as root: it can trigger changes on every pod.
const controlSocketName = "control.sock"

func controlSocketPath(stateDir string) string { return filepath.Join(stateDir, controlSocketName) }

// Wire types of the control API (JSON).
type (
	endpointJSON struct {
		Index    int    `json:"index"`
		Tap      string `json:"tap"`            // the device the NIC's queues come from
		Kind     string `json:"kind,omitempty"` // macvtap, tap-link, macvtap-link; "" for the tcfilter tap
		Link     string `json:"link"`
		Ifindex  int    `json:"ifindex"`
		MAC      string `json:"mac"`
		Queues   int    `json:"queues"`
		Removing bool   `json:"removing,omitempty"`
		Guest    string `json:"guest,omitempty"` // configured, pending, waiting for the link: …, agent unreachable: …, off
	}
	skippedJSON struct {
		Link    string `json:"link"`
		Kind    string `json:"kind"`
		Adopted bool   `json:"adopted"`
		Broken  bool   `json:"broken,omitempty"` // adopted, but the runtime's wiring lacks what Reason says
		Reason  string `json:"reason"`
	}
	statusJSON struct {
		ID            string         `json:"id"`
		Netns         string         `json:"netns"`
		QMP           string         `json:"qmp"`
		Monitor       string         `json:"monitor,omitempty"`      // the socket's protocol: qmp or hmp
		Flavour       string         `json:"flavour,omitempty"`      // the Kata runtime that made the VM
		Runtime       string         `json:"runtime,omitempty"`      // its containerd runtime name
		MonitorNote   string         `json:"monitor_note,omitempty"` // why the monitor is this one (no wrapper socket, …)
		LeftAlone     string         `json:"left_alone,omitempty"`   // why tapsync wires nothing here (a confidential handler)
		Source        string         `json:"source"`
		LastReconcile *time.Time     `json:"last_reconcile,omitempty"`
		LastError     string         `json:"last_error,omitempty"`
		Mutations     int            `json:"last_mutations"`
		Retries       int            `json:"retries"`
		Pending       []int          `json:"pending_removals,omitempty"`
		Held          []int          `json:"held_plugs,omitempty"` // endpoints waiting for the NIC they replace to leave
		Endpoints     []endpointJSON `json:"endpoints"`
		Skipped       []skippedJSON  `json:"skipped,omitempty"`
		Model         string         `json:"model,omitempty"`
		RxRate        uint64         `json:"rx_rate,omitempty"`
		TxRate        uint64         `json:"tx_rate,omitempty"`
		Notes         []string       `json:"notes,omitempty"` // what tapsync cannot do for wired links (a rate a kind cannot carry)
		Agent         string         `json:"agent,omitempty"` // the guest agent's URL
		Guest         string         `json:"guest,omitempty"` // off: …, agent unreachable: …; "" when fine
	}
	planJSON struct {
		Sandbox string        `json:"sandbox"`
		Actions []string      `json:"actions"`
		Skipped []skippedJSON `json:"skipped,omitempty"`
		Error   string        `json:"error,omitempty"`
	}
	capacityJSON struct {
		Sandbox string `json:"sandbox"`
		Free    int    `json:"free"`
		Summary string `json:"summary"`
	}
	resyncJSON struct {
		Triggered []string `json:"triggered"`
	}
	errorJSON struct {
		Error string `json:"error"`
	}
)

func skippedOf(s []reconcile.Skipped) []skippedJSON {
	var out []skippedJSON
	for _, k := range s {
		out = append(out, skippedJSON{Link: k.Link.Name, Kind: k.Link.Kind, Adopted: k.Adopted, Broken: k.Broken, Reason: k.Reason})
	}
	return out
}

func (d *daemon) statusJSON() []statusJSON {
	var out []statusJSON
	for _, st := range d.rec.Status() {
		id := st.Sandbox.ID
		monitor := st.Sandbox.Monitor
		if monitor == "" {
			monitor = reconcile.MonitorQMP
		}
		s := statusJSON{ID: id, Netns: st.Sandbox.Netns, QMP: st.Sandbox.QMP, Monitor: monitor, Flavour: st.Sandbox.Flavour, Runtime: st.Sandbox.Runtime, MonitorNote: st.Sandbox.MonitorNote, Source: string(st.Source),
			LastError: st.LastError, Mutations: st.Mutations, Retries: d.queue.Failures(id), Pending: st.Pending, Held: st.Held, Skipped: skippedOf(st.Skipped),
			Endpoints: []endpointJSON{}, Guest: st.Guest, Model: st.Sandbox.Model, RxRate: st.Sandbox.RxRate, TxRate: st.Sandbox.TxRate,
			Notes: st.Notes}
		if st.Sandbox.Agent.Scheme != "" {
			s.Agent = st.Sandbox.Agent.String()
		}
		if !st.LastReconcile.IsZero() {
			t := st.LastReconcile
			s.LastReconcile = &t
		}
		for _, e := range st.Endpoints {
			s.Endpoints = append(s.Endpoints, endpointJSON{Index: e.Index, Tap: reconcile.DeviceName(e), Kind: e.Kind, Link: e.LinkName,
				Ifindex: e.LinkIfindex, MAC: e.LinkMAC, Queues: e.Queues, Removing: e.Removing, Guest: st.GuestEndpoints[e.Index]})
		}
		out = append(out, s)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, sb := range d.skipped {
		out = append(out, statusJSON{ID: sb.ID, Netns: sb.Netns, Flavour: sb.Flavour, Runtime: sb.Runtime,
			LeftAlone: sb.Skip, Source: string(watcher.SourceContainerd), Endpoints: []endpointJSON{}})
	}
	slices.SortFunc(out[len(out)-len(d.skipped):], func(a, b statusJSON) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// rootOnly wraps a unix listener and drops connections from non-root peers.
type rootOnly struct{ *net.UnixListener }

func (l rootOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return nil, err
		}
		if peerIsRoot(c) {
			return c, nil
		}
		c.Close()
	}
}

// peerIsRoot reports whether the process on the other end runs as root.
func peerIsRoot(c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || credErr != nil || cred == nil {
		return false
	}
	return cred.Uid == 0
}

func (d *daemon) serveControl(ctx context.Context) (io.Closer, error) {
	path := controlSocketPath(d.config().StateDir)
	// A socket left by a previous run (killed) is stale: we own the state dir.
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	known := func(w http.ResponseWriter, id string) bool {
		for _, s := range d.rec.Sandboxes() {
			if s == id {
				return true
			}
		}
		reply(w, http.StatusNotFound, errorJSON{Error: fmt.Sprintf("unknown sandbox %q", id)})
		return false
	}
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, d.statusJSON())
	})
	mux.HandleFunc("GET /v1/plan", func(w http.ResponseWriter, r *http.Request) {
		ids := d.rec.Sandboxes()
		if id := r.URL.Query().Get("sandbox"); id != "" {
			if !known(w, id) {
				return
			}
			ids = []string{id}
		}
		out := []planJSON{}
		for _, id := range ids {
			pj := planJSON{Sandbox: id, Actions: []string{}}
			p, err := d.plan(r.Context(), id)
			if err != nil {
				pj.Error = err.Error()
			}
			for _, a := range p.Actions {
				pj.Actions = append(pj.Actions, a.String())
			}
			pj.Skipped = skippedOf(p.Skipped)
			out = append(out, pj)
		}
		reply(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /v1/capacity", func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("sandbox")
		if !known(w, id) {
			return
		}
		c, err := d.rec.HotplugCapacity(r.Context(), id)
		if err != nil {
			reply(w, http.StatusBadGateway, errorJSON{Error: err.Error()})
			return
		}
		reply(w, http.StatusOK, capacityJSON{Sandbox: id, Free: c.Free(), Summary: c.String()})
	})
	mux.HandleFunc("POST /v1/resync", func(w http.ResponseWriter, r *http.Request) {
		ids := d.rec.Sandboxes()
		if id := r.URL.Query().Get("sandbox"); id != "" {
			if !known(w, id) {
				return
			}
			ids = []string{id}
		}
		for _, id := range ids {
			d.trigger(id, "control")
		}
		zerolog.Ctx(ctx).Info().Strs("sandboxes", ids).Str("reason", "control socket").Msg("resync requested")
		reply(w, http.StatusAccepted, resyncJSON{Triggered: ids})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	go srv.Serve(rootOnly{ln})
	return srv, nil
}

// plan computes a sandbox's plan without applying it, once a pass under
// way has ended (reconcile's Plan). It changes nothing on disk either: a
// record that cannot be read is shown as empty but left for the next pass
// to set aside.
func (d *daemon) plan(ctx context.Context, id string) (reconcile.Plan, error) {
	ctx = state.ReadOnly(ctx)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return d.rec.Plan(ctx, id)
}

// controlClient talks to a running daemon.
type controlClient struct {
	socket string
	http   *http.Client
}

func newControlClient(socket string) *controlClient {
	return &controlClient{socket: socket, http: &http.Client{
		Timeout: time.Minute,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		}},
	}}
}

func (c *controlClient) do(method, path string, out any) error {
	req, err := http.NewRequest(method, "http://tapsync"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("talk to the daemon on %s (is `tapsync run` running, and are you root?): %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var e errorJSON
		json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("daemon: %s: %s", resp.Status, e.Error)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// capacity asks the daemon where sandbox id's VM can still take NICs.
func (c *controlClient) capacity(id string) (capacityJSON, error) {
	var cap capacityJSON
	return cap, c.do("GET", "/v1/capacity?sandbox="+url.QueryEscape(id), &cap)
}

// status asks the daemon for its status.
func (c *controlClient) status() ([]statusJSON, error) {
	var st []statusJSON
	return st, c.do("GET", "/v1/status", &st)
}
