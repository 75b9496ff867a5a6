package results

import (
	"encoding/json"
	"math"
	"reflect"
	"testing"
)

func TestHistogramJSON(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    Histogram
	}{
		{"with +Inf", Histogram{Count: 3, Sum: 0.25, Bounds: []float64{0.001, 0.5, math.Inf(1)}, Buckets: []uint64{1, 2, 3}}},
		{"empty", Histogram{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp := ControlPlane{NetworkProgramming: &tc.h}
			data, err := json.Marshal(cp)
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			var got ControlPlane
			if err := json.Unmarshal(data, &got); err != nil {
				t.Fatalf("Unmarshal(%s): %v", data, err)
			}
			if !reflect.DeepEqual(got.NetworkProgramming, &tc.h) {
				t.Fatalf("round trip of %s = %+v, want %+v", data, got.NetworkProgramming, tc.h)
			}
		})
	}
	var h Histogram
	if err := json.Unmarshal([]byte(`{"bounds":["x"]}`), &h); err == nil {
		t.Fatal("a bound that is not a number was accepted")
	}
}
