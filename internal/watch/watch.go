// Package watch turns client-go informers on Services and EndpointSlices into
// typed calls on a Handler, with kube-proxy's filtering, and tells the handler
// when both caches have synced and the initial lists have been delivered, so
// that nothing is programmed from a partial view of the cluster.
//
// # Concurrency
//
// client-go dispatches each informer's events from that informer's own
// goroutine. Calls for one kind are therefore serial and in order (all
// Service calls come one after another, as do all EndpointSlice calls), but a
// Service call may run concurrently with an EndpointSlice call, and OnSynced
// runs on the goroutine that called Run, concurrently with either. A Handler
// must be safe for that (the model's change tracker holds a mutex). No Handler
// method is called after Run has returned.
package watch

import (
	"context"
	"errors"
	"fmt"
	"time"

	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// LabelServiceProxyName marks a Service (and its EndpointSlices) as handled by
// another service proxy; we, like kube-proxy, ignore such objects whatever the
// label's value. k8s.io/api does not define this label: upstream keeps it in
// k8s.io/kubernetes/pkg/proxy/apis, which we do not import.
const LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"

// Handler receives typed events. See the package documentation for the
// concurrency contract. Each object is made for the call from what the
// informers' caches keep (Transform), so it holds only what the handlers
// read; its strings and pointers are shared with the cache, so it must be
// treated as read-only.
type Handler interface {
	OnServiceUpsert(svc *v1.Service)
	OnServiceDelete(svc *v1.Service)
	OnEndpointSliceUpsert(slice *discoveryv1.EndpointSlice)
	OnEndpointSliceDelete(slice *discoveryv1.EndpointSlice)
	// OnSynced is called once, after both informers' caches have synced and
	// the events of the initial lists have been delivered.
	OnSynced()
}

// ForeignServiceHandler is implemented by a Handler that wants to know the
// Services another service proxy serves (labelled LabelServiceProxyName),
// which Selector leaves out: their ClusterIPs are not ours to refuse. Run
// watches them with a third informer, synced before OnSynced.
type ForeignServiceHandler interface {
	OnForeignServiceUpsert(svc *v1.Service)
	OnForeignServiceDelete(svc *v1.Service)
}

// foreignSelector selects the Services another service proxy serves.
func foreignSelector() labels.Selector {
	proxyName, err := labels.NewRequirement(LabelServiceProxyName, selection.Exists, nil)
	if err != nil {
		panic(fmt.Sprintf("building %s requirement: %v", LabelServiceProxyName, err))
	}
	return labels.NewSelector().Add(*proxyName)
}

// Selector returns the label selector that both informers list and watch
// with: objects owned by another service proxy and the EndpointSlices of
// headless Services are none of our business. It matches kube-proxy's.
func Selector() labels.Selector {
	noProxyName, err := labels.NewRequirement(LabelServiceProxyName, selection.DoesNotExist, nil)
	if err != nil {
		// Constant, valid key: cannot happen.
		panic(fmt.Sprintf("building %s requirement: %v", LabelServiceProxyName, err))
	}
	notHeadless, err := labels.NewRequirement(v1.IsHeadlessService, selection.DoesNotExist, nil)
	if err != nil {
		panic(fmt.Sprintf("building %s requirement: %v", v1.IsHeadlessService, err))
	}
	return labels.NewSelector().Add(*noProxyName, *notHeadless)
}

// Run starts the informers and blocks until ctx is done. resync is the
// informers' resync period (0 = none); a resync re-delivers every cached
// object as an upsert.
//
// Run returns nil when ctx ends after OnSynced has been called, ctx.Err() when
// ctx ends before both caches synced (OnSynced is then never called), and an
// error without starting anything if the informers cannot be set up. In every
// case the informers have stopped and no handler call is in flight when Run
// returns.
func Run(ctx context.Context, client kubernetes.Interface, h Handler, resync time.Duration) error {
	w, err := newWatcher(client, h, resync)
	if err != nil {
		return err
	}
	return w.run(ctx)
}

// watcher holds the informers of one Run. It is split from Run so that tests
// can observe the informers and registrations while Run is going.
type watcher struct {
	h        Handler
	factory  informers.SharedInformerFactory
	services cache.SharedIndexInformer
	slices   cache.SharedIndexInformer
	svcReg   cache.ResourceEventHandlerRegistration
	sliceReg cache.ResourceEventHandlerRegistration
	// foreign watches other proxies' Services, when h wants them
	// (ForeignServiceHandler); nil otherwise.
	foreignFactory informers.SharedInformerFactory
	foreign        cache.SharedIndexInformer
	foreignReg     cache.ResourceEventHandlerRegistration
}

func newWatcher(client kubernetes.Interface, h Handler, resync time.Duration) (*watcher, error) {
	if client == nil {
		return nil, errors.New("starting Service and EndpointSlice watches: no Kubernetes client")
	}
	if h == nil {
		return nil, errors.New("starting Service and EndpointSlice watches: no handler")
	}
	sel := Selector()
	selString := sel.String()
	factory := informers.NewSharedInformerFactoryWithOptions(client, resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.LabelSelector = selString
		}),
		informers.WithTransform(Transform))
	w := &watcher{
		h:        h,
		factory:  factory,
		services: factory.Core().V1().Services().Informer(),
		slices:   factory.Discovery().V1().EndpointSlices().Informer(),
	}
	var err error
	w.svcReg, err = w.services.AddEventHandler(&eventHandler[*v1.Service]{
		kind:     "Service",
		selector: sel,
		expand:   expandService,
		upsert:   h.OnServiceUpsert,
		remove:   h.OnServiceDelete,
	})
	if err != nil {
		return nil, fmt.Errorf("registering Service event handler: %w", err)
	}
	w.sliceReg, err = w.slices.AddEventHandler(&eventHandler[*discoveryv1.EndpointSlice]{
		kind:     "EndpointSlice",
		selector: sel,
		expand:   expandSlice,
		upsert:   h.OnEndpointSliceUpsert,
		remove:   h.OnEndpointSliceDelete,
	})
	if err != nil {
		return nil, fmt.Errorf("registering EndpointSlice event handler: %w", err)
	}
	if fh, ok := h.(ForeignServiceHandler); ok {
		fsel := foreignSelector()
		fselString := fsel.String()
		w.foreignFactory = informers.NewSharedInformerFactoryWithOptions(client, resync,
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.LabelSelector = fselString
			}),
			informers.WithTransform(Transform))
		w.foreign = w.foreignFactory.Core().V1().Services().Informer()
		w.foreignReg, err = w.foreign.AddEventHandler(&eventHandler[*v1.Service]{
			kind:     "Service",
			selector: fsel,
			expand:   expandService,
			upsert:   fh.OnForeignServiceUpsert,
			remove:   fh.OnForeignServiceDelete,
		})
		if err != nil {
			return nil, fmt.Errorf("registering the other proxies' Service event handler: %w", err)
		}
	}
	return w, nil
}

func (w *watcher) run(ctx context.Context) error {
	// Shutdown waits for the informer goroutines, which stop because ctx is
	// done by the time it runs; the informers in turn wait for their handler
	// goroutines, so no handler call outlives Run.
	defer w.factory.Shutdown()
	w.factory.Start(ctx.Done())
	checkers := []cache.DoneChecker{
		w.services.HasSyncedChecker(),
		w.slices.HasSyncedChecker(),
		w.svcReg.HasSyncedChecker(),
		w.sliceReg.HasSyncedChecker(),
	}
	if w.foreignFactory != nil {
		defer w.foreignFactory.Shutdown()
		w.foreignFactory.Start(ctx.Done())
		checkers = append(checkers, w.foreign.HasSyncedChecker(), w.foreignReg.HasSyncedChecker())
	}

	klog.InfoS("Waiting for informer caches to sync", "informers", "Service,EndpointSlice")
	// The informers' own checkers say the caches hold the initial lists; the
	// registrations' checkers say our handlers have also been handed every
	// event of those lists. Only the second pair matters for correctness (it
	// implies the first), the first is kept to spell out the contract.
	// WaitFor blocks on channels rather than polling like WaitForCacheSync.
	if !cache.WaitFor(ctx, "", checkers...) {
		klog.InfoS("Stopped before informer caches synced",
			"servicesSynced", w.svcReg.HasSynced(), "endpointSlicesSynced", w.sliceReg.HasSynced())
		<-ctx.Done() // WaitFor only gives up when ctx is done.
		return ctx.Err()
	}
	klog.InfoS("Informer caches synced", "informers", "Service,EndpointSlice",
		"services", len(w.services.GetStore().ListKeys()),
		"endpointSlices", len(w.slices.GetStore().ListKeys()))
	w.h.OnSynced()

	<-ctx.Done()
	klog.InfoS("Stopping Service and EndpointSlice informers")
	return nil
}

// eventHandler adapts client-go's untyped callbacks to one kind's typed
// Handler methods. It also applies the label selector itself: the API server
// already filters, but checking again costs little and keeps a misbehaving
// source (or a fake clientset, whose watches ignore selectors) from leaking
// foreign objects into the datapath.
type eventHandler[T interface {
	comparable
	metav1.Object
}] struct {
	kind     string
	selector labels.Selector
	// expand turns what the informer hands over (the cached form, see
	// compact.go, or the API object itself) into T.
	expand func(any) (T, bool)
	upsert func(T)
	remove func(T)
}

var _ cache.ResourceEventHandler = (*eventHandler[*v1.Service])(nil)

func (e *eventHandler[T]) cast(obj any, event string) (T, bool) {
	t, ok := e.expand(obj)
	if !ok {
		klog.ErrorS(nil, "Ignoring informer event with unexpected object type",
			"kind", e.kind, "event", event, "type", fmt.Sprintf("%T", obj))
		return t, false
	}
	return t, true
}

func (e *eventHandler[T]) wanted(t T) bool {
	return e.selector.Matches(labels.Set(t.GetLabels()))
}

func (e *eventHandler[T]) OnAdd(obj any, _ bool) {
	t, ok := e.cast(obj, "add")
	if !ok || !e.wanted(t) {
		return
	}
	e.upsert(t)
}

func (e *eventHandler[T]) OnUpdate(oldObj, newObj any) {
	t, ok := e.cast(newObj, "update")
	if !ok {
		return
	}
	if e.wanted(t) {
		e.upsert(t)
		return
	}
	// The object gained a label that excludes it. Server-side filtering turns
	// that into a delete; do the same, unless it was already excluded before.
	if old, ok := e.expand(oldObj); ok && !e.wanted(old) {
		return
	}
	e.remove(t)
}

func (e *eventHandler[T]) OnDelete(obj any) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		// The watch missed the delete; the relist noticed the object is gone.
		// Obj is the last state the cache had.
		t, ok := e.expand(tomb.Obj)
		if !ok {
			klog.ErrorS(nil, "Ignoring tombstone with unexpected object type",
				"kind", e.kind, "key", tomb.Key, "type", fmt.Sprintf("%T", tomb.Obj))
			return
		}
		if e.wanted(t) {
			e.remove(t)
		}
		return
	}
	t, ok := e.cast(obj, "delete")
	if !ok || !e.wanted(t) {
		// An excluded object was never upserted, or was removed when it
		// became excluded.
		return
	}
	e.remove(t)
}
