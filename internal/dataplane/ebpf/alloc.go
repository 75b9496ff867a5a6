package ebpf

import "fmt"

// idAllocator hands out ids in 1..max; 0 is never used so that it can mark
// "no backend" in slot layouts. It allocates next-fit rather than lowest-free:
// a freed id is reused only after every other id has been handed out, so a
// program that read an old service id just before a delete is very unlikely
// to find that id already standing for another service.
type idAllocator struct {
	max  uint32
	next uint32
	// used has bit id set for each id in use: a bitmap of max bits costs
	// 32 KiB at the default --bpf-backend-slots-max, where a set of the 100k
	// backends of 10k Services x 10 endpoints cost 2 MiB.
	used []uint64
	// above holds ids past max found in the maps (pinned by a proxy
	// whose capacity was larger): never handed out, but they hold map
	// entries, so they count as in use until released.
	above map[uint32]struct{}
	count uint32
}

func newIDAllocator(max uint32) *idAllocator {
	return &idAllocator{max: max, next: 1, used: make([]uint64, (uint64(max)+1+63)/64)}
}

func (a *idAllocator) isUsed(id uint32) bool {
	if id > a.max {
		_, ok := a.above[id]
		return ok
	}
	return a.used[id/64]&(1<<(id%64)) != 0
}

func (a *idAllocator) set(id uint32) {
	switch {
	case a.isUsed(id):
		return
	case id > a.max:
		if a.above == nil {
			a.above = make(map[uint32]struct{})
		}
		a.above[id] = struct{}{}
	default:
		a.used[id/64] |= 1 << (id % 64)
	}
	a.count++
}

// reserve marks an id found in a pinned map as taken, and moves the
// allocation point past it, so a restarted proxy continues where the last one
// stopped.
func (a *idAllocator) reserve(id uint32) {
	a.set(id)
	if id >= a.next {
		a.next = id + 1
		if a.next > a.max || a.next == 0 {
			a.next = 1
		}
	}
}

func (a *idAllocator) allocate() (uint32, error) {
	if a.count >= a.max {
		return 0, fmt.Errorf("all %d ids are in use", a.max)
	}
	for {
		id := a.next
		a.next++
		if a.next > a.max || a.next == 0 {
			a.next = 1
		}
		if !a.isUsed(id) {
			a.set(id)
			return id, nil
		}
	}
}

func (a *idAllocator) release(id uint32) {
	switch {
	case !a.isUsed(id):
		return
	case id > a.max:
		delete(a.above, id)
	default:
		a.used[id/64] &^= 1 << (id % 64)
	}
	a.count--
}

// free reports how many ids allocate can still hand out.
func (a *idAllocator) free() int { return max(int(a.max)-int(a.count), 0) }
