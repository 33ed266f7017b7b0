package watcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// containerd 2 keeps a record of every pod sandbox in its Sandbox Store,
// whichever sandboxer made it. With the "podsandbox" sandboxer the pod
// also has a pause container and task (under the sandbox's id), which
// the container path follows; with the "shim" sandboxer (runtime-rs
// supports it) the record is all there is. CRI calls its sandbox
// controllers in-process, so such pods publish no containerd event: CRI's
// own event stream (GetContainerEvents) carries their start and stop.

// criMetadata is what we read of the CRI's "metadata" extension of a
// Sandbox Store record: JSON {"Version": "v1", "Metadata": {...}}.
type criMetadata struct {
	Version  string
	Metadata struct {
		ID             string
		NetNSPath      string
		RuntimeHandler string
	}
}

// criMetadataExtension names the extension CRI stores its metadata under.
const criMetadataExtension = "metadata"

// storeSandbox returns the sandbox a Sandbox Store record describes, and
// whether it is live (its netns exists), or why it is not one of ours.
func (w *ctrWatcher) storeSandbox(ns string, rec sandbox.Sandbox) (Sandbox, bool, skipReason) {
	if !MatchRuntime(w.cfg.Runtimes, rec.Runtime.Name) {
		return Sandbox{}, false, skipReason{why: fmt.Sprintf("runtime %q is not watched", rec.Runtime.Name)}
	}
	ext, ok := rec.Extensions[criMetadataExtension]
	if !ok || ext == nil {
		return Sandbox{}, false, skipReason{why: "Sandbox Store record has no CRI metadata extension", loud: true}
	}
	var md criMetadata
	if err := json.Unmarshal(ext.GetValue(), &md); err != nil {
		return Sandbox{}, false, skipReason{why: fmt.Sprintf("Sandbox Store record's CRI metadata is malformed: %v", err), loud: true}
	}
	if md.Metadata.NetNSPath == "" {
		return Sandbox{}, false, skipReason{why: "Sandbox Store record names no network namespace (host network)", loud: true}
	}
	sb := w.kataSandbox(ns, rec.ID, rec.Runtime.Name, md.Metadata.NetNSPath)
	// A stopped pod's netns is gone (CRI removes it at stop); its record
	// stays until the pod is removed.
	_, err := os.Lstat(md.Metadata.NetNSPath)
	return sb, !errors.Is(err, fs.ErrNotExist), skipReason{}
}

// listStore reports the live sandboxes of namespace ns's Sandbox Store
// that no container in byContainer speaks for, and remembers the others.
// A containerd without a Sandbox Store (1.6) lists nothing.
func (w *ctrWatcher) listStore(ctx context.Context, cli *client.Client, ns string, byContainer map[ctrKey]bool) (listed []string, err error) {
	nctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), ctrCallTimeout)
	defer cancel()
	// Equivalent to: ctr -n k8s.io sandboxes ls
	recs, err := cli.SandboxStore().List(nctx)
	if unimplemented(err) {
		if !w.noStore {
			w.log.Debug().Err(err).Msg("containerd has no Sandbox Store (before 1.7): sandboxes come from containers only")
		}
		w.noStore = true
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list the Sandbox Store of containerd at %s in namespace %s: %w", w.cfg.Address, ns, err)
	}
	w.noStore = false
	for _, rec := range recs {
		key := ctrKey{ns, rec.ID}
		if byContainer[key] {
			continue // its pause container speaks for it
		}
		if id, ok := w.storeRecord(ns, rec, "in the Sandbox Store at (re)connect"); ok {
			listed = append(listed, id)
		}
		if _, ok := w.rejected[key]; ok || w.known[key] {
			byContainer[key] = true // keeps its rejection from being pruned
		}
	}
	return listed, nil
}

// storeRecord emits what one Sandbox Store record says: KindUpsert for a
// live sandbox, KindGone for a known one that no longer is. It returns
// the id when the sandbox is live.
func (w *ctrWatcher) storeRecord(ns string, rec sandbox.Sandbox, why string) (string, bool) {
	key := ctrKey{ns, rec.ID}
	sb, live, skip := w.storeSandbox(ns, rec)
	if skip.why != "" {
		w.logSkip(ns, rec.ID, skip)
		return "", false
	}
	if !live {
		if w.known[key] {
			delete(w.known, key)
			w.goneEvent(key, "its network namespace is gone (pod stopped)")
		}
		w.known[key] = true
		return "", false
	}
	sb, ok := w.admit(ns, sb, 0)
	if !ok {
		return "", false
	}
	w.upsert(ns, sb, why)
	return sb.ID, true
}

// storeChanged looks at sandbox id of namespace ns again after CRI said
// it changed: a record of ours is upserted or reported gone; a record
// that no longer exists is gone.
func (w *ctrWatcher) storeChanged(ctx context.Context, cli *client.Client, ns, id, why string) error {
	key := ctrKey{ns, id}
	nctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), ctrCallTimeout)
	defer cancel()
	rec, err := cli.SandboxStore().Get(nctx, id)
	switch {
	case errdefs.IsNotFound(err):
		if w.known[key] {
			delete(w.known, key)
			w.goneEvent(key, why)
		}
		delete(w.rejected, key)
		return nil
	case unimplemented(err):
		return nil
	case err != nil:
		return fmt.Errorf("get sandbox %s from the Sandbox Store of containerd at %s in namespace %s: %w", id, w.cfg.Address, ns, err)
	}
	if _, found, err := w.get(ctx, cli, ns, id); err != nil {
		return err
	} else if found {
		// A pause container speaks for it. Its task's start is reported
		// by /tasks/start, but the shim's /tasks/exit and /tasks/delete
		// race its shutdown and are sometimes lost (containerd 2.4):
		// CRI's stop is the reliable word that it ended.
		live, _, err := w.taskLive(ctx, cli, ns, id)
		if err != nil || live {
			return err
		}
		return w.gone(ctx, cli, ns, id, why, false)
	}
	w.storeRecord(ns, rec, why)
	return nil
}

func unimplemented(err error) bool {
	return err != nil && (errdefs.IsNotImplemented(err) || status.Code(errors.Unwrap(err)) == codes.Unimplemented || status.Code(err) == codes.Unimplemented)
}

// criEvent is a pod sandbox event from CRI's stream.
type criEvent struct {
	id   string
	kind runtimeapi.ContainerEventType
}

// followCRI streams CRI's container events from the CRI service on
// containerd's socket, and sends each pod sandbox's (container id = its
// pod's id) to out until ctx ends or the stream fails. It returns why it
// stopped; unavailable reports a containerd that serves no CRI (or an
// old one without the stream).
func followCRI(ctx context.Context, address string, out chan<- criEvent) (unavailable bool, err error) {
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return true, fmt.Errorf("CRI at %s: %w", address, err)
	}
	defer conn.Close()
	// Equivalent to: crictl events (kubelet's evented PLEG)
	stream, err := runtimeapi.NewRuntimeServiceClient(conn).GetContainerEvents(ctx, &runtimeapi.GetEventsRequest{})
	if err != nil {
		return status.Code(err) == codes.Unimplemented, fmt.Errorf("CRI events at %s: %w", address, err)
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			return status.Code(err) == codes.Unimplemented, fmt.Errorf("CRI events at %s: %w", address, err)
		}
		pod := ev.GetPodSandboxStatus().GetId()
		if pod != "" && pod != ev.GetContainerId() {
			continue // an app container's
		}
		select {
		case out <- criEvent{id: ev.GetContainerId(), kind: ev.GetContainerEventType()}:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}

// criNamespace is the containerd namespace CRI keeps its pods in.
const criNamespace = "k8s.io"

// criEventWhy says what a CRI event means for a sandbox, for logs.
func criEventWhy(k runtimeapi.ContainerEventType) string {
	return "CRI " + strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(k.String(), "CONTAINER_"), "_EVENT")) + " pod sandbox"
}

// storePollEvery is the fallback ticker: a relist of the Sandbox Store
// while CRI's stream is down (nil channel while it is up).
func storePollEvery(d time.Duration, up bool) (<-chan time.Time, func()) {
	if up {
		return nil, func() {}
	}
	t := time.NewTicker(d)
	return t.C, t.Stop
}
