package main

import (
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/tapsync/tapsync/reconcile"
)

// metrics are the daemon's Prometheus series, on their own registry.
type metrics struct {
	reg      *prometheus.Registry
	triggers *prometheus.CounterVec
	// triggersBy holds triggers' counter of each source seen, found once:
	// a lookup by label hashes the label on every netlink event.
	triggersBy        sync.Map // source → prometheus.Counter
	reconcileDuration prometheus.Histogram
	convergeLatency   prometheus.Histogram
	reconcileErrors   *prometheus.CounterVec
	retries           prometheus.Counter
	gcRecords         prometheus.Counter
}

// triggered counts one trigger from source.
func (m *metrics) triggered(source string) {
	if c, ok := m.triggersBy.Load(source); ok {
		c.(prometheus.Counter).Inc()
		return
	}
	c := m.triggers.WithLabelValues(source)
	m.triggersBy.Store(source, c)
	c.Inc()
}

// latencyBuckets span a converged add (milliseconds) to a stuck unplug.
var latencyBuckets = prometheus.ExponentialBuckets(0.001, 2, 16)

func newMetrics(d *daemon) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		triggers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tapsync_triggers_total", Help: "Requests to look at a sandbox, by source.",
		}, []string{"source"}),
		reconcileDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tapsync_reconcile_duration_seconds", Help: "Duration of one observe-plan-apply pass over a sandbox.", Buckets: latencyBuckets,
		}),
		convergeLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tapsync_trigger_to_converged_seconds", Help: "Time from the first trigger of a sandbox to its next successful pass.", Buckets: latencyBuckets,
		}),
		reconcileErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tapsync_reconcile_errors_total",
			Help: "Passes that failed or were left waiting (retried with backoff), by cause: qmp, netns, state, agent, waiting, changed, other.",
		}, []string{"cause"}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tapsync_reconcile_retries_total", Help: "Failed passes of sandboxes that had already failed before.",
		}),
		gcRecords: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tapsync_records_garbage_collected_total", Help: "Records deleted because their netns was gone.",
		}),
	}
	for _, c := range reconcile.Causes {
		m.reconcileErrors.WithLabelValues(c) // every cause shows, at 0 until it happens
	}
	m.reg.MustRegister(m.triggers, m.reconcileDuration, m.convergeLatency, m.reconcileErrors, m.retries, m.gcRecords,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tapsync_queue_depth", Help: "Sandboxes waiting for a worker."},
			func() float64 { return float64(d.queue.Len()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tapsync_failing_sandboxes", Help: "Sandboxes whose last pass failed or is waiting."},
			func() float64 { return float64(d.failures.Failing()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tapsync_sandboxes", Help: "Registered sandboxes."},
			func() float64 { return float64(len(d.rec.Sandboxes())) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tapsync_netlink_resubscriptions_total", Help: "Netlink subscriptions (links, addresses, routes, tc) re-established after a failure."},
			func() float64 { return float64(d.links.Resubscriptions()) }),
		endpointsCollector{d},
		agentCallsCollector{d},
	)
	return m
}

func (d *daemon) metricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.m.reg, promhttp.HandlerOpts{}))
	// Liveness: the event loop answers and no pass is stuck.
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := d.alive(2 * time.Second); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	// Readiness: the first full resync is done.
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-d.ready:
			fmt.Fprintln(w, "ok")
		default:
			http.Error(w, "the first full resync is not done yet", http.StatusServiceUnavailable)
		}
	})
	return mux
}

// endpointsCollector reports endpoints by state from the last passes.
type endpointsCollector struct{ d *daemon }

var endpointsDesc = prometheus.NewDesc("tapsync_endpoints", "Endpoints by state (wired, removing).", []string{"state"}, nil)

func (c endpointsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- endpointsDesc
	ch <- guestEndpointsDesc
	ch <- adoptedDesc
}

func (c endpointsCollector) Collect(ch chan<- prometheus.Metric) {
	var wired, removing float64
	for _, st := range c.d.rec.Status() {
		for _, e := range st.Endpoints {
			if e.Removing {
				removing++
			} else {
				wired++
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, wired, "wired")
	ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, removing, "removing")
	var configured, unconfigured float64
	for _, st := range c.d.rec.Status() {
		for _, g := range st.GuestEndpoints {
			if g == reconcile.GuestConfigured {
				configured++
			} else {
				unconfigured++
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(guestEndpointsDesc, prometheus.GaugeValue, configured, "configured")
	ch <- prometheus.MustNewConstMetric(guestEndpointsDesc, prometheus.GaugeValue, unconfigured, "not_configured")
	var adopted, broken float64
	for _, st := range c.d.rec.Status() {
		for _, k := range st.Skipped {
			switch {
			case k.Broken:
				broken++
			case k.Adopted:
				adopted++
			}
		}
	}
	ch <- prometheus.MustNewConstMetric(adoptedDesc, prometheus.GaugeValue, adopted, "ok")
	ch <- prometheus.MustNewConstMetric(adoptedDesc, prometheus.GaugeValue, broken, "broken")
}

var adoptedDesc = prometheus.NewDesc("tapsync_adopted_links", "Container links wired by the runtime (Kata) and adopted, by state: ok, or broken (its redirect or NIC is missing).", []string{"state"}, nil)

var guestEndpointsDesc = prometheus.NewDesc("tapsync_guest_endpoints", "Endpoints by guest state (configured by the agent, or not: pending, waiting, unreachable, off).", []string{"state"}, nil)

// agentCallsCollector counts the calls made to guest agents.
type agentCallsCollector struct{ d *daemon }

var agentCallsDesc = prometheus.NewDesc("tapsync_agent_calls_total", "Calls to guest agents, by method (List* look at the guest, the others change it).", []string{"method"}, nil)

func (c agentCallsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- agentCallsDesc }

func (c agentCallsCollector) Collect(ch chan<- prometheus.Metric) {
	calls := c.d.rec.AgentCalls()
	for _, m := range []string{"ListInterfaces", "ListRoutes", "UpdateInterface", "UpdateRoutes", "AddARPNeighbors"} {
		ch <- prometheus.MustNewConstMetric(agentCallsDesc, prometheus.CounterValue, float64(calls[m]), m)
	}
}
