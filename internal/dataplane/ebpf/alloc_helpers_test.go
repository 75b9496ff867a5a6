package ebpf

// inUse returns the ids in use, for tests: it walks every id up to max.
func (a *idAllocator) inUse() map[uint32]struct{} {
	out := make(map[uint32]struct{}, a.count)
	for id := uint32(1); id <= a.max && id != 0; id++ {
		if a.isUsed(id) {
			out[id] = struct{}{}
		}
	}
	for id := range a.above {
		out[id] = struct{}{}
	}
	return out
}
