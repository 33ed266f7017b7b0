package deploy

import (
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// readDaemonSet decodes deploy/daemonset.yaml strictly against the
// Kubernetes API types: a misspelt or misplaced field fails, as the API
// server would refuse it.
func readDaemonSet(t *testing.T) *appsv1.DaemonSet {
	t.Helper()
	b, err := os.ReadFile("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(b, &ds); err != nil {
		t.Fatalf("daemonset.yaml: %v", err)
	}
	return &ds
}

func TestDaemonSetValid(t *testing.T) {
	ds := readDaemonSet(t)
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" {
		t.Errorf("apiVersion %q kind %q, want apps/v1 DaemonSet", ds.APIVersion, ds.Kind)
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostPID || !spec.HostNetwork {
		t.Errorf("hostPID %v hostNetwork %v, want both", spec.HostPID, spec.HostNetwork)
	}
	if sel := ds.Spec.Selector.MatchLabels; len(sel) == 0 || !mapSubset(sel, ds.Spec.Template.Labels) {
		t.Errorf("selector %v does not match the template's labels %v", sel, ds.Spec.Template.Labels)
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
		if v.HostPath != nil && v.HostPath.Type == nil {
			t.Errorf("hostPath volume %s has no type: a missing path would be made as a directory", v.Name)
		}
	}
	all := append(slices.Clone(spec.InitContainers), spec.Containers...)
	for _, c := range all {
		if strings.HasSuffix(c.Image, ":latest") || !strings.Contains(c.Image, ":") {
			t.Errorf("container %s: image %q, want a tag of `make image`, not latest", c.Name, c.Image)
		}
		if c.Image != spec.Containers[0].Image {
			t.Errorf("container %s: image %q differs from %q", c.Name, c.Image, spec.Containers[0].Image)
		}
		for _, m := range c.VolumeMounts {
			if _, ok := volumes[m.Name]; !ok {
				t.Errorf("container %s mounts volume %s, which is not declared", c.Name, m.Name)
			}
		}
		if sc := c.SecurityContext; sc == nil || (sc.Privileged == nil || !*sc.Privileged) && sc.Capabilities == nil {
			t.Errorf("container %s: no privileges and no capabilities: it cannot do its work as root's", c.Name)
		}
	}
	if len(spec.InitContainers) != 1 || !slices.Contains(spec.InitContainers[0].Command, "install-kata") {
		t.Errorf("init containers %v, want one running tapsync install-kata", spec.InitContainers)
	}
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "run" {
		t.Errorf("args %v, want tapsync run", c.Args)
	}
	for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		want := map[string]string{"liveness": "/healthz", "readiness": "/readyz"}[name]
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != want {
			t.Errorf("%s probe %+v, want an HTTP GET of %s", name, p, want)
		}
	}
	if c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources %+v, want memory requests and limits", c.Resources)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	for path, prop := range map[string]corev1.MountPropagationMode{
		"/var/run/netns":  corev1.MountPropagationHostToContainer,
		"/run/vc":         corev1.MountPropagationHostToContainer,
		"/run/kata":       corev1.MountPropagationHostToContainer,
		"/run/containerd": corev1.MountPropagationHostToContainer,
	} {
		m, ok := mounts[path]
		if !ok || m.MountPropagation == nil || *m.MountPropagation != prop {
			t.Errorf("mount %s: %+v, want it with %s propagation", path, m, prop)
		}
	}
	for _, path := range []string{"/run/tapsync", "/dev/net/tun", "/etc/tapsync"} {
		if _, ok := mounts[path]; !ok {
			t.Errorf("no mount at %s", path)
		}
	}
}

// A typo in a field name is refused: the check above can fail.
func TestDaemonSetStrict(t *testing.T) {
	b, err := os.ReadFile("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(b), "mountPropagation:", "mountPropogation:", 1)
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict([]byte(bad), &ds); err == nil || !strings.Contains(err.Error(), "mountPropogation") {
		t.Errorf("a misspelt field decoded: %v", err)
	}
}

func mapSubset(a, b map[string]string) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
