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
	used map[uint32]struct{}
}

func newIDAllocator(max uint32) *idAllocator {
	return &idAllocator{max: max, next: 1, used: make(map[uint32]struct{})}
}

// reserve marks an id found in a pinned map as taken, and moves the
// allocation point past it, so a restarted proxy continues where the last one
// stopped.
func (a *idAllocator) reserve(id uint32) {
	a.used[id] = struct{}{}
	if id >= a.next {
		a.next = id + 1
		if a.next > a.max || a.next == 0 {
			a.next = 1
		}
	}
}

func (a *idAllocator) allocate() (uint32, error) {
	if uint32(len(a.used)) >= a.max {
		return 0, fmt.Errorf("all %d ids are in use", a.max)
	}
	for {
		id := a.next
		a.next++
		if a.next > a.max || a.next == 0 {
			a.next = 1
		}
		if _, taken := a.used[id]; !taken {
			a.used[id] = struct{}{}
			return id, nil
		}
	}
}

func (a *idAllocator) release(id uint32) { delete(a.used, id) }

// free reports how many ids allocate can still hand out.
func (a *idAllocator) free() int { return max(int(a.max)-len(a.used), 0) }
