package ebpf

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// A start swaps the datapath from what is pinned (an earlier run's
// programs, maybe of another version, reading the pinned maps) to the
// programs just loaded, which may read resized maps. The swap is all or
// nothing: every step that changes what the kernel runs or what bpffs
// holds records how to undo it, and a failure at any step undoes them all,
// newest first.
//
// An earlier run's link is not updated in place but replaced: the new
// program is attached beside it through a new link, and the old link goes
// only when the swap commits. Updating in place would need the previous
// program to undo with, and a restarted process can open a program it did
// not load only by id, which takes CAP_SYS_ADMIN (BPF_PROG_GET_FD_BY_ID): the
// manifests' base grants BPF, PERFMON and NET_ADMIN only, and an operator may drop
// the SYS_ADMIN the ebpf overlay adds for another purpose. Until the commit,
// each hook runs the old program and then the new one, both reading the
// same entries (the resized maps are copies, and what the old programs
// write into the LRU maps meanwhile is copied again at the commit): the
// first to act translates,
// and the second finds a backend where it looks for a Service, or a VIP
// where it looks for a backend, and leaves the call alone. So the old set
// keeps serving, whole, until the commit; and a hook is never without a
// program.
//
// Nothing new is pinned before the commit, so the pins keep describing the
// datapath that serves. The commit pins new maps and links, replacing the
// old pins one by one (each undone if a later one fails), then detaches the
// old links.

// pinnable is what bpffs holds for us: maps and links.
type pinnable interface{ Pin(string) error }

// swapOps are the steps of a swap that change what the kernel runs or what
// bpffs holds. kernelSwapOps does them; tests wrap it to fail any one.
type swapOps interface {
	// attach attaches a program to a cgroup through a new link.
	attach(link.CgroupOptions) (link.Link, error)
	// pin makes path name obj, replacing what it named before in one
	// step. obj must be a handle that knows of no pin of its own (a new
	// object, or a copy from unpinnedCopy): cilium/ebpf moves an existing
	// pin instead of making one.
	pin(obj pinnable, path string) error
}

type kernelSwapOps struct{}

func (kernelSwapOps) attach(opts link.CgroupOptions) (link.Link, error) {
	return link.AttachCgroup(opts)
}

// pinSuffix names a pin while it is being put in place (bpffs refuses
// names with a dot).
const pinSuffix = "-swap"

// pin pins obj under a temporary name and renames that over path: bpffs
// renames atomically, so path names the old object or the new one, never
// nothing, also if the process dies in between.
func (kernelSwapOps) pin(obj pinnable, path string) error {
	tmp := path + pinSuffix
	// Left by a process that died between pin and rename.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := obj.Pin(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// swap is one start's swap in progress.
type swap struct {
	ops swapOps
	// undo holds how to reverse each step done so far, in order.
	undo []undoStep
	// pins are to be made when the programs are all in place.
	pins []pendingPin
	// replaced are the earlier run's links, detached at the commit.
	replaced []link.Link
	// held are handles the swap needs until it ends either way, such as
	// the objects an undo pins back.
	held []io.Closer
	// legacy are the pinned maps of an earlier version's layout that the
	// swap replaces, by name, for their entries to be carried over.
	legacy map[string]*ebpf.Map
	// resizedFrom are the pinned maps that resized copies replace, by
	// name, for the copies to be brought up to date.
	resizedFrom map[string]*ebpf.Map
	// recopy are the resized maps the programs write (the LRU maps),
	// copied once more after the commit (see commit).
	recopy []recopy
}

// recopy is a resized map the old programs kept writing after its copy.
type recopy struct {
	name     string
	from, to *ebpf.Map
}

type undoStep struct {
	what string
	fn   func() error
}

type pendingPin struct {
	what string
	obj  pinnable
	path string
	// previous is what path named before, to pin again on undo; nil if
	// path did not exist.
	previous pinnable
}

func newSwap(ops swapOps) *swap {
	if ops == nil {
		ops = kernelSwapOps{}
	}
	return &swap{ops: ops}
}

func (s *swap) done(what string, undo func() error) {
	s.undo = append(s.undo, undoStep{what, undo})
}

func (s *swap) hold(c io.Closer) { s.held = append(s.held, c) }

// release closes the handles the swap held; the kernel objects live on
// where pins or links reference them.
func (s *swap) release() {
	for _, c := range s.held {
		c.Close()
	}
	s.held = nil
}

// rollback undoes every step done, newest first, and returns cause with
// what became of the datapath.
func (s *swap) rollback(cause error) error {
	var errs []error
	for i := len(s.undo) - 1; i >= 0; i-- {
		if err := s.undo[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", s.undo[i].what, err))
		}
	}
	s.undo = nil
	if len(errs) > 0 {
		return fmt.Errorf("%w; undoing the program swap failed too, so the pins may not all be the "+
			"datapath's of before (a later start replaces them all again): %w", cause, errors.Join(errs...))
	}
	return fmt.Errorf("%w; nothing was changed, the previous datapath (if any) keeps serving", cause)
}

// openMaps returns, for each pinned map, the map the new programs are to
// read. A map pinned as the spec wants it is used as it is. One that
// differs in capacity only (a --bpf-*-max flag changed) gets a copy of the
// new size holding its entries, one of an earlier version's layout that
// its pinnedMaps entry replaces gets a new map of the new layout (load
// carries over what entries it can), and a map not pinned yet a new one:
// all are pinned when the swap commits, so that until then the old pins
// (and the programs reading them) keep serving.
func (s *swap) openMaps(spec *ebpf.CollectionSpec, dir string) (map[string]*ebpf.Map, error) {
	maps := make(map[string]*ebpf.Map, len(pinnedMaps))
	for _, m := range pinnedMaps {
		want := spec.Maps[m.name]
		path := filepath.Join(dir, m.name)
		pinned, err := ebpf.LoadPinnedMap(path, nil)
		switch {
		case errors.Is(err, os.ErrNotExist):
			fresh, err := s.newUnpinned(want, m.name)
			if err != nil {
				return nil, err
			}
			maps[m.name] = fresh
			s.pins = append(s.pins, pendingPin{what: "map " + m.name, obj: fresh, path: path})
			continue
		case err != nil:
			return nil, fmt.Errorf("opening pinned map %s: %w", m.name, err)
		}
		s.hold(pinned)
		if m.replaces != nil && want.Compatible(pinned) != nil && m.replaces(pinned) {
			fresh, err := s.newUnpinned(want, m.name)
			if err != nil {
				return nil, err
			}
			previous, err := s.previousOf(pinned, m.name)
			if err != nil {
				return nil, err
			}
			klog.InfoS("Replacing a pinned map an earlier version made", "map", m.name)
			if s.legacy == nil {
				s.legacy = make(map[string]*ebpf.Map)
			}
			s.legacy[m.name] = pinned
			maps[m.name] = fresh
			s.pins = append(s.pins, pendingPin{what: "replaced map " + m.name, obj: fresh, path: path, previous: previous})
			continue
		}
		resized, err := resized1(want, pinned, m.flag)
		if err != nil {
			return nil, err
		}
		if resized == nil {
			maps[m.name] = pinned
			continue
		}
		s.hold(resized)
		previous, err := s.previousOf(pinned, m.name)
		if err != nil {
			return nil, err
		}
		if want.Type == ebpf.LRUHash {
			s.recopy = append(s.recopy, recopy{name: m.name, from: pinned, to: resized})
		}
		if s.resizedFrom == nil {
			s.resizedFrom = make(map[string]*ebpf.Map)
		}
		s.resizedFrom[m.name] = pinned
		maps[m.name] = resized
		s.pins = append(s.pins, pendingPin{what: "resized map " + m.name, obj: resized, path: path, previous: previous})
	}
	return maps, nil
}

// newUnpinned creates a map as want describes it, held by the swap and
// pinned by none yet: the commit pins it, as name.
func (s *swap) newUnpinned(want *ebpf.MapSpec, name string) (*ebpf.Map, error) {
	unpinned := want.Copy()
	unpinned.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(unpinned)
	if err != nil {
		return nil, fmt.Errorf("creating map %s: %w", name, err)
	}
	s.hold(m)
	return m, nil
}

// previousOf is a handle of the pinned map name without the pin's path,
// held by the swap, for an undo to pin back.
func (s *swap) previousOf(pinned *ebpf.Map, name string) (*ebpf.Map, error) {
	previous, err := pinned.Clone()
	if err != nil {
		return nil, fmt.Errorf("opening pinned map %s: %w", name, err)
	}
	s.hold(previous)
	return previous, nil
}

// attachProgram attaches prog to its hook in the cgroup through a new link
// and returns the link, for the caller to close. A link pinned by an earlier
// run, in this cgroup or another (the flag changed), is replaced when the
// swap commits.
func (s *swap) attachProgram(p program, prog *ebpf.Program, cfg Config) (link.Link, error) {
	pin := filepath.Join(cfg.BPFFSPath, linksDir, p.name)
	var previous link.Link
	old, err := link.LoadPinnedLink(pin, nil)
	switch {
	case err == nil:
		s.hold(old)
		s.replaced = append(s.replaced, old)
		if previous, err = unpinnedCopy(old); err != nil {
			return nil, fmt.Errorf("opening pinned %s link: %w", p.name, err)
		}
		s.hold(previous)
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("opening pinned %s link: %w", p.name, err)
	}
	l, err := s.ops.attach(link.CgroupOptions{Path: cfg.CgroupPath, Attach: p.attach, Program: prog})
	if err != nil {
		return nil, fmt.Errorf("attaching %s to %s: %w", p.name, cfg.CgroupPath, err)
	}
	s.done("detaching the new "+p.name+" link", func() error { return detach(l) })
	s.pins = append(s.pins, pendingPin{what: p.name + " link", obj: l, path: pin, previous: previous})
	return l, nil
}

// commit pins what the swap made: new maps and links where there was
// nothing, resized maps and new links over the old pins. Each pin is undone
// if a later one fails. Then the old links go: from here on, each hook runs
// the new program alone.
func (s *swap) commit() error {
	for _, p := range s.pins {
		if err := s.ops.pin(p.obj, p.path); err != nil {
			return fmt.Errorf("pinning %s: %w", p.what, err)
		}
		s.done("pinning back what "+p.path+" named", func() error {
			if p.previous == nil {
				return os.Remove(p.path)
			}
			return s.ops.pin(p.previous, p.path)
		})
	}
	s.undo = nil
	for _, old := range s.replaced {
		// Unpinned now, an old link also goes when the swap closes its
		// handle; detaching says when, and failing to is no reason to
		// undo a swap that is done.
		if err := old.Detach(); err != nil {
			klog.ErrorS(err, "Detaching a replaced program link; it goes when released")
		}
	}
	// Until the old links went, the old programs ran first on every hook
	// and wrote what they translated (a socket's reverse entry, a
	// client's affinity) into the old maps, after those were copied: copy
	// what the new maps lack, so that those sockets' replies still show
	// the VIP. An entry the new programs wrote meanwhile is newer and
	// stays. A failure loses only those entries: the swap is done.
	for _, rc := range s.recopy {
		n, err := copyMissing(rc.to, rc.from)
		if err != nil {
			klog.ErrorS(err, "Copying the entries written during the swap into a resized map", "map", rc.name, "copied", n)
			continue
		}
		klog.V(2).InfoS("Copied the entries written during the swap", "map", rc.name, "entries", n)
	}
	return nil
}

// copyMissing copies the entries of from whose keys to lacks, and returns
// how many it copied. from and to are LRU maps of byte values.
func copyMissing(to, from *ebpf.Map) (int, error) {
	var (
		key, value []byte
		copied     int
	)
	it := from.Iterate()
	for it.Next(&key, &value) {
		err := to.Update(key, value, ebpf.UpdateNoExist)
		switch {
		case err == nil:
			copied++
		case errors.Is(err, ebpf.ErrKeyExist):
		default:
			return copied, err
		}
	}
	return copied, it.Err()
}

// detach takes a link's program off its hook at once and closes the link.
// Closing alone would do for a link nothing else holds, but the kernel
// releases a link whose pin goes asynchronously: detaching says when.
func detach(l link.Link) error {
	return errors.Join(l.Detach(), l.Close())
}

// unpinnedCopy is a second handle of a link that knows of no pin, so that
// pinning it makes a pin instead of moving the one the link came from.
func unpinnedCopy(l link.Link) (link.Link, error) {
	withFD, ok := l.(interface{ FD() int })
	if !ok {
		return nil, fmt.Errorf("link %T has no file descriptor", l)
	}
	dup, err := unix.FcntlInt(uintptr(withFD.FD()), unix.F_DUPFD_CLOEXEC, 1)
	if err != nil {
		return nil, fmt.Errorf("duplicating link: %w", err)
	}
	return link.NewFromFD(dup) // closes dup on failure
}
