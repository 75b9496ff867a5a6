package dataplane

import (
	"errors"
	"fmt"
	"strings"

	"github.com/kube-bpf-proxy/kube-bpf-proxy/internal/model"
)

// Reasons a single service port could not be programmed. They are stable:
// metrics and Events use them.
const (
	// ReasonMapFull: a BPF map, or the ids it is indexed by, is at
	// capacity; the message names the flag that sizes it.
	ReasonMapFull = "map-full"
	// ReasonWriteFailed: the kernel refused a write for another reason
	// (out of memory, for instance).
	ReasonWriteFailed = "write-failed"
)

// Reasons lists every Reason* constant, for metrics that export each one.
var Reasons = []string{ReasonMapFull, ReasonWriteFailed}

// ServiceError is a failure confined to one service port: the datapath
// left that port as it was before the sync (its old backends, or absent if
// it is new) and went on with the others.
type ServiceError struct {
	Service  model.ServicePortName
	Frontend model.Frontend
	// Reason is one of the Reason* constants.
	Reason string
	Err    error
}

func (e *ServiceError) Error() string {
	return fmt.Sprintf("service port %s (%s): %v", e.Service, e.Frontend, e.Err)
}

func (e *ServiceError) Unwrap() error { return e.Err }

// SyncError is what Sync returns when it applied a snapshot only in part.
// With Err nil, every service port but those in Services was applied: the
// datapath is being kept up to date, and the failed ports wait for the
// operator (a capacity flag) or a retry. With Err set, the sync as a whole
// failed and the datapath may lag behind the snapshot anywhere.
type SyncError struct {
	Services []*ServiceError
	Err      error
}

func (e *SyncError) Error() string {
	var parts []string
	if e.Err != nil {
		parts = append(parts, e.Err.Error())
	}
	for _, s := range e.Services {
		parts = append(parts, s.Error())
	}
	return strings.Join(parts, "; ")
}

func (e *SyncError) Unwrap() []error {
	errs := make([]error, 0, len(e.Services)+1)
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	for _, s := range e.Services {
		errs = append(errs, s)
	}
	return errs
}

// OnlyServicesFailed reports whether err says that some service ports
// failed one by one while everything else was applied, and returns them.
func OnlyServicesFailed(err error) ([]*ServiceError, bool) {
	var se *SyncError
	if !errors.As(err, &se) || se.Err != nil || len(se.Services) == 0 {
		return nil, false
	}
	return se.Services, true
}

// ErrBusy is wrapped by errors of syncs that changed nothing because
// another program held what the datapath must hold to write (the xtables
// lock, past the wait): what was applied before stays in force, exactly,
// so the same changes can be applied later by a partial sync. The caller
// keeps its state, hands the changes again, and backs off rather than
// retrying at once or in full, which would hold the lock longer still.
var ErrBusy = errors.New("another program holds a lock the datapath needs")

// OnlyBusy reports whether err is a sync failing as a whole only because
// of ErrBusy: every error it joins (a layered datapath's layers, say) is
// one, or names single service ports (SyncError.Services).
func OnlyBusy(err error) bool {
	var se *SyncError
	if errors.As(err, &se) {
		err = se.Err
	}
	return err != nil && allBusy(err)
}

func allBusy(err error) bool {
	for {
		if err == ErrBusy {
			return true
		}
		switch u := err.(type) {
		case *SyncError:
			// Its ports failed one by one; what matters is the rest.
			if err = u.Err; err == nil {
				return false
			}
		case interface{ Unwrap() []error }:
			errs := u.Unwrap()
			if len(errs) == 0 {
				return false
			}
			for _, e := range errs {
				if !allBusy(e) {
					return false
				}
			}
			return true
		case interface{ Unwrap() error }:
			if err = u.Unwrap(); err == nil {
				return false
			}
		default:
			return false
		}
	}
}
