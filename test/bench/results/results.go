// Package results is the benchmark's data model: what one `make bench` run
// measured, cell by cell (a contender at a number of background Services).
// The harness (test/bench) fills it; test/bench/report turns it into
// the markdown report, the CSV files and the plots. It is also written as
// results.json beside the report, so a report can be rebuilt without
// measuring again.
package results

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Contender names, in the order a run measures them.
const (
	// Direct has no proxy at all: clients reach pod IPs only. It is the
	// physical limit every ratio is taken against.
	Direct = "direct"
	// EBPF is kube-bpf-proxy --mode=ebpf.
	EBPF = "ebpf"
	// IptablesNFT and IptablesLegacy are kube-bpf-proxy --mode=iptables
	// with --iptables-backend=nft and legacy.
	IptablesNFT    = "iptables-nft"
	IptablesLegacy = "iptables-legacy"
	// KubeProxyIptables, KubeProxyIptablesNFT and KubeProxyNFTables are
	// upstream kube-proxy at the pinned Kubernetes version,
	// --proxy-mode=iptables on the legacy backend and on the nft backend,
	// and --proxy-mode=nftables: each of our iptables backends has
	// upstream's on the same backend to be judged against.
	KubeProxyIptables    = "kube-proxy-iptables"
	KubeProxyIptablesNFT = "kube-proxy-iptables-nft"
	KubeProxyNFTables    = "kube-proxy-nftables"
)

// AllContenders is every contender in measuring order.
var AllContenders = []string{Direct, EBPF, IptablesNFT, IptablesLegacy, KubeProxyIptables, KubeProxyIptablesNFT, KubeProxyNFTables}

// Latency workloads (Paired.Workload).
const (
	// TCPConnect is the time connect() takes (SYN to SYN-ACK, plus any
	// translation at connect time), from a new socket per sample.
	TCPConnect = "tcp-connect"
	// TCPCRR is a whole transaction on a new connection: connect, a
	// 1-byte request, the 1-byte answer, close (netperf's TCP_CRR).
	TCPCRR = "tcp-crr"
	// TCPRR is a 1-byte request/response over one kept connection
	// (netperf's TCP_RR): the control, where translation costs nothing.
	TCPRR = "tcp-rr"
	// UDPConnected and UDPUnconnected are a datagram and its echo, from a
	// connected socket and from an unconnected one (sendto each time).
	UDPConnected   = "udp-connected"
	UDPUnconnected = "udp-unconnected"
)

// Rate workloads (RatePhase.Workload).
const (
	// ConnectRate is new connections per second, every core loaded.
	ConnectRate = "tcp-connect-rate"
	// Stream is bulk TCP throughput, bytes per second.
	Stream = "tcp-stream"
)

// Run is one benchmark run.
type Run struct {
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration"`
	// Command is the exact command line that produced it.
	Command string  `json:"command"`
	Quick   bool    `json:"quick"`
	Machine Machine `json:"machine"`
	// Topology says what the run set up, for the report's header.
	Topology Topology `json:"topology"`
	// Contenders and Sizes are the matrix asked for, in order; Cells has
	// one entry per pair tried or skipped.
	Contenders []string `json:"contenders"`
	Sizes      []int    `json:"sizes"`
	// Family is the IP family every cell measured: "IPv4" (also when
	// empty, in runs recorded before IPv6 rows) or "IPv6".
	Family string `json:"family,omitempty"`
	Cells  []Cell `json:"cells"`
	// Bulk holds each growth of the background Services that was made
	// with a contender's proxies running (ebpf's, when it is in the run).
	Bulk []BulkCreate `json:"bulk,omitempty"`
}

// BulkCreate is the background Services growing from From to To with
// Contender's proxies running: how long the creation took through the
// API, and how long after it finished a client first reached the last
// Service created.
type BulkCreate struct {
	Contender string        `json:"contender"`
	From      int           `json:"from"`
	To        int           `json:"to"`
	Creating  time.Duration `json:"creating"`
	Served    time.Duration `json:"served"`
	// TimedOut says the client never reached it; Served is then how long
	// it waited.
	TimedOut bool `json:"timedOut,omitempty"`
}

// Machine describes where the run happened.
type Machine struct {
	Kernel            string `json:"kernel"`
	CPUModel          string `json:"cpuModel"`
	CPUs              int    `json:"cpus"`
	MemoryBytes       int64  `json:"memoryBytes"`
	GoVersion         string `json:"goVersion"`
	KubernetesVersion string `json:"kubernetesVersion"`
	IptablesVersion   string `json:"iptablesVersion"`
	NftVersion        string `json:"nftVersion"`
	ProxyVersion      string `json:"proxyVersion"`
}

// Topology is the cluster the run measured.
type Topology struct {
	Nodes      int `json:"nodes"`
	ClientPods int `json:"clientPods"`
	ServerPods int `json:"serverPods"`
	// EndpointsPerService is the number of endpoints of each background
	// Service.
	EndpointsPerService int `json:"endpointsPerService"`
	// Repetitions is how many times each workload was repeated in a cell
	// (the spread of the ratios is taken across them).
	Repetitions int `json:"repetitions"`
}

// Cell is one contender at one number of background Services.
type Cell struct {
	Contender string `json:"contender"`
	// Family is the IP family of the cell's Services and pod addresses:
	// "IPv4" (also when empty) or "IPv6".
	Family string `json:"family,omitempty"`
	// Size is the number of background Services (each with endpoints)
	// that existed in the API while the cell was measured.
	Size int `json:"size"`
	// Skipped, if set, says why nothing was measured (for example "did
	// not serve 10000 Services within 3m0s" or "did not reach 10000
	// Services before: not tried"); the other fields are then empty
	// except Elapsed and ControlPlane.ColdStart, which say how far it
	// got.
	Skipped string `json:"skipped,omitempty"`
	// Incomplete, if set, says which steps of a cell that was measured
	// failed (an endpoint change never observed, say); what was measured
	// is kept and shown.
	Incomplete string `json:"incomplete,omitempty"`
	// Elapsed is the cell's wall time, set-up included.
	Elapsed time.Duration `json:"elapsed"`
	// Latency holds the latency workloads, each measured alternating the
	// pod IP (direct) and the ClusterIP (service) sample by sample.
	Latency []Paired `json:"latency,omitempty"`
	// Rates holds the rate workloads' phases, alternating direct and
	// service phase by phase.
	Rates        []RatePhase  `json:"rates,omitempty"`
	ControlPlane ControlPlane `json:"controlPlane"`
	Proxy        ProxyUsage   `json:"proxy"`
}

// FamilyOf is a cell's or run's Family as shown: "IPv4" when empty.
func FamilyOf(f string) string {
	if f == "" {
		return "IPv4"
	}
	return f
}

// Paired is one latency workload of a cell.
type Paired struct {
	Workload string `json:"workload"`
	Reps     []Rep  `json:"reps"`
}

// Rep is one repetition of a latency workload: samples in microseconds, in
// the order taken. Service is empty for the direct contender (no proxy
// serves the ClusterIP).
type Rep struct {
	Direct        []float64 `json:"direct"`
	Service       []float64 `json:"service,omitempty"`
	DirectErrors  int       `json:"directErrors,omitempty"`
	ServiceErrors int       `json:"serviceErrors,omitempty"`
}

// Target names the address a sample or phase went to.
const (
	TargetDirect  = "direct"
	TargetService = "service"
)

// RatePhase is one phase of a rate workload: every client worked against
// one target for Seconds.
type RatePhase struct {
	Workload string  `json:"workload"`
	Rep      int     `json:"rep"`
	Target   string  `json:"target"`
	Seconds  float64 `json:"seconds"`
	// Ops is connections completed (ConnectRate) or bytes received by the
	// servers' side of the connection, as written by clients (Stream).
	Ops    int64 `json:"ops"`
	Errors int64 `json:"errors"`
	// NodeCPUSeconds is the CPU time the whole machine spent in the phase
	// (user, system, softirq and irq of every core: the clients, the
	// servers, the kernel's datapath and the proxy), from /proc/stat.
	NodeCPUSeconds float64 `json:"nodeCpuSeconds"`
	// ProxyCPUSeconds is the proxies' own processes' CPU time in the phase
	// (both nodes), from /proc/<pid>/stat.
	ProxyCPUSeconds float64 `json:"proxyCpuSeconds"`
}

// ControlPlane is what a cell measured of programming the datapath.
type ControlPlane struct {
	// ColdStart is the time from starting the proxies on nodes with
	// nothing programmed (no pins, no rules) until a client on node1
	// reached the last-created background Service and the benchmark's
	// Service; zero for direct. If the proxies did not get there,
	// ColdStartTimedOut is set and ColdStart is how long was waited.
	ColdStart         time.Duration `json:"coldStart"`
	ColdStartTimedOut bool          `json:"coldStartTimedOut,omitempty"`
	// BatchServices Services (each with endpoints) were created with the
	// proxies running; BatchServed is the time from the last creation
	// returning until a client reached the last of them.
	BatchServices int           `json:"batchServices,omitempty"`
	BatchServed   time.Duration `json:"batchServed,omitempty"`
	// BatchTimedOut says the batch was not served (or not created):
	// BatchServed is then how long was waited.
	BatchTimedOut bool `json:"batchTimedOut,omitempty"`
	// EndpointChange holds, for each change of a Service's only endpoint
	// made while other Services' endpoints churn, the time from the API's
	// answer to the update until a client's connection reached the new
	// endpoint.
	EndpointChange []time.Duration `json:"endpointChange,omitempty"`
	// EndpointChangeTimedOut says a change was never seen by the client
	// (the timing stops at the first such change): EndpointChange holds
	// only the ones seen before it.
	EndpointChangeTimedOut bool `json:"endpointChangeTimedOut,omitempty"`
	// NetworkProgramming is the proxies' own
	// kubeproxy_network_programming_duration_seconds at the end of the
	// cell (both nodes merged); nil when the contender exports none.
	NetworkProgramming *Histogram `json:"networkProgramming,omitempty"`
}

// Histogram is a Prometheus histogram: cumulative counts at upper bounds
// (seconds), the last bound +Inf.
type Histogram struct {
	Count   uint64    `json:"count"`
	Sum     float64   `json:"sum"`
	Bounds  []float64 `json:"bounds"`
	Buckets []uint64  `json:"buckets"`
}

// histogramJSON is Histogram's JSON form. encoding/json refuses +Inf, and
// every histogram's last bound is +Inf: bounds are written as strings the
// way Prometheus writes its "le" label ("0.005", "+Inf").
type histogramJSON struct {
	Count   uint64   `json:"count"`
	Sum     float64  `json:"sum"`
	Bounds  []string `json:"bounds"`
	Buckets []uint64 `json:"buckets"`
}

// MarshalJSON writes the bounds as strings (see histogramJSON).
func (h Histogram) MarshalJSON() ([]byte, error) {
	j := histogramJSON{Count: h.Count, Sum: h.Sum, Buckets: h.Buckets}
	if h.Bounds != nil {
		j.Bounds = make([]string, len(h.Bounds))
	}
	for i, b := range h.Bounds {
		switch {
		case math.IsInf(b, 1):
			j.Bounds[i] = "+Inf"
		case math.IsInf(b, -1):
			j.Bounds[i] = "-Inf"
		default:
			j.Bounds[i] = strconv.FormatFloat(b, 'g', -1, 64)
		}
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads what MarshalJSON wrote.
func (h *Histogram) UnmarshalJSON(data []byte) error {
	var j histogramJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return err
	}
	*h = Histogram{Count: j.Count, Sum: j.Sum, Buckets: j.Buckets}
	if j.Bounds != nil {
		h.Bounds = make([]float64, len(j.Bounds))
	}
	for i, s := range j.Bounds {
		// ParseFloat accepts "+Inf" and "-Inf".
		b, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return fmt.Errorf("histogram bound %q: %w", s, err)
		}
		h.Bounds[i] = b
	}
	return nil
}

// ProxyUsage is the proxies' own resource use in the cell.
type ProxyUsage struct {
	// RSSBytes is the larger of the two nodes' proxies' resident set
	// after the cell's workloads.
	RSSBytes int64 `json:"rssBytes,omitempty"`
	// CPUSeconds is both proxies' CPU time from their start to the end of
	// the cell (the cold start's sync included).
	CPUSeconds float64 `json:"cpuSeconds,omitempty"`
}
