package main

import (
	"errors"
	"testing"
)

func TestChooseMemorySettings(t *testing.T) {
	noLimit := func() (int64, bool, error) { return 0, false, nil }
	limit := func() (int64, bool, error) { return 200 << 20, true, nil }
	broken := func() (int64, bool, error) { return 0, false, errors.New("no cgroup2 mount") }
	for _, tc := range []struct {
		name  string
		env   map[string]string
		limit func() (int64, bool, error)
		want  memorySettings
	}{
		{"nothing set, no cgroup limit", nil, noLimit, memorySettings{gcPercent: defaultGCPercent}},
		{"nothing set, a cgroup limit", nil, limit, memorySettings{gcPercent: defaultGCPercent, memoryLimit: 180 << 20}},
		{"GOGC set", map[string]string{"GOGC": "100"}, noLimit, memorySettings{}},
		{"GOGC off", map[string]string{"GOGC": "off"}, noLimit, memorySettings{}},
		{"GOMEMLIMIT set wins over the cgroup", map[string]string{"GOMEMLIMIT": "80MiB"}, limit, memorySettings{gcPercent: defaultGCPercent}},
		{"cgroup unreadable", nil, broken, memorySettings{gcPercent: defaultGCPercent}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := chooseMemorySettings(func(k string) string { return tc.env[k] }, tc.limit)
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}
