package reconcile

import (
	"net"
	"testing"

	"github.com/tapsync/tapsync/qmp"
	"github.com/tapsync/tapsync/state"
)

func knownModel() *vmModel {
	m := &vmModel{known: true, netdevs: []int{1, 2}, nics: []qmp.NICInfo{
		{ID: qmp.DeviceID(1), Index: 1, Owned: true, Bus: "br", Addr: "1f.0", QOMPath: "/machine/peripheral/" + qmp.DeviceID(1)},
		{ID: qmp.DeviceID(2), Index: 2, Owned: true, Bus: "br", Addr: "1e.0", QOMPath: "/machine/peripheral/" + qmp.DeviceID(2)},
	}}
	m.topo.Take("br", 0x1f)
	m.topo.Take("br", 0x1e)
	return m
}

// Events keep the model or make it unknown; none leaves it wrong.
func TestModelEvents(t *testing.T) {
	m := knownModel()
	m.event(qmp.Event{Name: "NIC_RX_FILTER_CHANGED", Data: map[string]any{"path": "/machine/peripheral/" + qmp.DeviceID(1) + "/virtio-backend"}})
	m.event(qmp.Event{Name: "DEVICE_DELETED", Data: map[string]any{"path": "/machine/peripheral/" + qmp.DeviceID(2) + "/virtio-backend"}})
	if _, _, ok := m.fresh(); !ok || len(m.nics) != 2 {
		t.Fatalf("after a harmless event and a backend's DEVICE_DELETED: known %v, nics %+v", ok, m.nics)
	}
	m.event(qmp.Event{Name: "DEVICE_DELETED", Data: map[string]any{"device": qmp.DeviceID(2), "path": "/machine/peripheral/" + qmp.DeviceID(2)}})
	nics, netdevs, ok := m.fresh()
	if !ok || len(nics) != 1 || nics[0].Index != 1 || len(netdevs) != 2 {
		t.Fatalf("after NIC 2's DEVICE_DELETED: known %v, nics %+v, netdevs %v; want NIC 1 and both netdevs (netdev_del is ours to send)", ok, nics, netdevs)
	}
	if at := m.place(3, qmp.Placement{}); at != nil {
		t.Errorf("placed at %+v on a model without that bus in its topology", at)
	}
	if m.topo.Equal(knownModel().topo) {
		t.Error("NIC 2's slot still taken")
	}
	for _, name := range []string{"RESET", "SHUTDOWN", "SOMETHING_NEW"} {
		m := knownModel()
		m.event(qmp.Event{Name: name})
		if _, _, ok := m.fresh(); ok {
			t.Errorf("model still trusted after %s", name)
		}
	}
	m = knownModel()
	m.event(qmp.Event{Name: "DEVICE_DELETED", Data: map[string]any{"path": "/machine/peripheral-anon/device[3]"}})
	if _, _, ok := m.fresh(); ok {
		t.Error("model still trusted after a device it does not hold was deleted")
	}
	// A verify due: the model is not used until a full observation.
	m = knownModel()
	m.verify = true
	if at := m.place(3, qmp.Placement{}); at != nil {
		t.Error("a model with a verify due placed a NIC")
	}
	if _, _, ok := m.fresh(); ok {
		t.Error("a model with a verify due was used")
	}
}

// The record accounts for a VM's NICs when each of ours has its endpoint
// recorded, each recorded endpoint its NIC, none is mid-change, each of
// our taps has its NIC, and each tap link a NIC with its MAC.
func TestAccounted(t *testing.T) {
	nic := func(i int) qmp.NICInfo { return qmp.NICInfo{ID: qmp.DeviceID(i), Index: i, Owned: true} }
	other := qmp.NICInfo{ID: "kata-nic", Index: -1, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}}
	rec := func(es ...state.Endpoint) state.Record { return state.Record{Endpoints: es} }
	tapLink := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	withMAC := func(n qmp.NICInfo, mac net.HardwareAddr) qmp.NICInfo { n.MAC = mac; return n }
	for _, tc := range []struct {
		name     string
		rec      state.Record
		nics     []qmp.NICInfo
		taps     []int
		tapLinks []net.HardwareAddr
		want     bool
	}{
		{"nothing of ours", rec(), []qmp.NICInfo{other}, nil, nil, true},
		{"one to one", rec(state.Endpoint{Index: 0}, state.Endpoint{Index: 1}), []qmp.NICInfo{nic(0), other, nic(1)}, []int{1, 0}, nil, true},
		{"an endpoint without its NIC", rec(state.Endpoint{Index: 0}, state.Endpoint{Index: 1}), []qmp.NICInfo{nic(0)}, []int{0, 1}, nil, false},
		{"a NIC not recorded", rec(state.Endpoint{Index: 0}), []qmp.NICInfo{nic(0), nic(1)}, []int{0, 1}, nil, false},
		{"removing", rec(state.Endpoint{Index: 0, Removing: true}), []qmp.NICInfo{nic(0)}, []int{0}, nil, false},
		{"unplug requested", rec(state.Endpoint{Index: 0, UnplugRequested: true}), []qmp.NICInfo{nic(0)}, []int{0}, nil, false},
		{"burned", rec(state.Endpoint{Index: 0, Burned: true}), []qmp.NICInfo{nic(0)}, []int{0}, nil, false},
		// The record lost with the VM's last NIC of ours: the tap it left
		// (and its netdev may hold) has no NIC.
		{"a tap of ours without its NIC, nothing recorded", rec(), []qmp.NICInfo{other}, []int{0}, nil, false},
		{"a tap link with its NIC", rec(state.Endpoint{Index: 0}), []qmp.NICInfo{withMAC(nic(0), tapLink)}, nil, []net.HardwareAddr{tapLink}, true},
		{"a tap link adopted", rec(), []qmp.NICInfo{withMAC(other, tapLink)}, nil, []net.HardwareAddr{tapLink}, true},
		// The same for a tap link handed to QEMU: its netdev may hold it.
		{"a tap link without a NIC, nothing recorded", rec(), []qmp.NICInfo{other}, nil, []net.HardwareAddr{tapLink}, false},
	} {
		if got := accounted(tc.rec, tc.nics, tc.taps, tc.tapLinks); got != tc.want {
			t.Errorf("%s: accounted = %v, want %v", tc.name, got, tc.want)
		}
	}
}
