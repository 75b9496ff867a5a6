package ebpf

import (
	"os"
	"regexp"
	"strconv"
	"testing"
)

// The flag bits and range kinds the programs read are C enums that BTF
// does not carry (no map or struct uses their types), so keys.go copies
// them: this keeps the copies in step with bpf/lb.c.
func TestSvcFlagsMatchLbC(t *testing.T) {
	src, err := os.ReadFile("../../../bpf/lb.c")
	if err != nil {
		t.Fatal(err)
	}
	defined := make(map[string]uint64)
	for _, m := range regexp.MustCompile(`(?m)^\s*((?:SVC|RANGE)_[A-Z_]+) = (?:1 << (\d+)|(0x[0-9a-f]+|\d+)),`).FindAllSubmatch(src, -1) {
		var v uint64
		if len(m[2]) > 0 {
			shift, _ := strconv.Atoi(string(m[2]))
			v = 1 << shift
		} else {
			v, _ = strconv.ParseUint(string(m[3]), 0, 32)
		}
		defined[string(m[1])] = v
	}
	for name, want := range map[string]uint64{
		"SVC_ID_MASK":             uint64(svcIDMask),
		"SVC_F_AFFINITY":          uint64(svcFlagAffinity),
		"SVC_F_NO_LOCAL_ENDPOINT": uint64(svcFlagNoLocalEndpoint),
		"SVC_F_NODEPORT":          uint64(svcFlagNodePort),
		"SVC_F_EXTERNAL":          uint64(svcFlagExternal),
		"SVC_F_NODE_NETNS_ONLY":   uint64(svcFlagNodeNetNSOnly),
		"RANGE_END":               uint64(rangeEnd),
		"RANGE_SERVICE_CIDR":      uint64(rangeServiceCIDR),
		"RANGE_CLUSTER_IPS":       uint64(rangeClusterIPs),
	} {
		got, ok := defined[name]
		if !ok {
			t.Errorf("%s is not defined in lb.c", name)
		} else if got != want {
			t.Errorf("%s is %#x in lb.c, %#x in keys.go", name, got, want)
		}
	}
	if len(defined) != 9 {
		t.Errorf("lb.c defines %v, keys.go copies 9 of them", defined)
	}
	spec, err := loadLb()
	if err != nil {
		t.Fatal(err)
	}
	if got := spec.Maps[lbMapKbpSvcRanges].MaxEntries; got != maxRanges {
		t.Errorf("lb.c's %s holds %d ranges, the reconciler lays out %d", lbMapKbpSvcRanges, got, maxRanges)
	}
}
