//! Admission control for a server: at most `max_in_flight` requests run at once, up to
//! `queue_depth` more wait for a slot in arrival order, and anything beyond that is shed at once
//! with tower's [`Overloaded`] (→ `UNAVAILABLE`, counted as load shed).
//!
//! This is what `LoadShed` over `Buffer` over `ConcurrencyLimit` does, without the buffer's worker
//! task: a request that finds a free slot runs in the caller's task directly, so the common case
//! costs one atomic operation instead of two task wake-ups (measured in docs/BENCHMARKS.md).
//! Waiting requests queue on a fair semaphore; a caller that gives up (deadline, disconnect) leaves
//! the queue when its future is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::load_shed::error::Overloaded;
use tower::{Layer, Service, ServiceExt};

use crate::boxed::BoxError;

#[derive(Debug)]
struct State {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_depth: usize,
}

/// See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    state: Arc<State>,
}

impl AdmissionLayer {
    /// `max_in_flight` is raised to at least 1; `queue_depth` 0 means no queue (shed whenever
    /// every slot is taken).
    pub fn new(max_in_flight: usize, queue_depth: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        AdmissionLayer {
            state: Arc::new(State {
                slots: Arc::new(Semaphore::new(max_in_flight)),
                waiting: AtomicUsize::new(0),
                queue_depth,
            }),
        }
    }

    /// Requests waiting for a slot right now.
    pub fn waiting(&self) -> usize {
        self.state.waiting.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    state: Arc<State>,
}

/// Leaves the queue when dropped, whether the wait ended with a slot or was abandoned.
struct InQueue(Arc<State>);

impl Drop for InQueue {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run<S, R>(
    mut inner: S,
    req: R,
    _slot: OwnedSemaphorePermit,
) -> Result<S::Response, BoxError>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    let svc = inner.ready().await.map_err(Into::into)?;
    svc.call(req).await.map_err(Into::into)
}

impl<S, R> Service<R> for Admission<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is decided per request in `call` (admit, queue or shed), and the inner
        // service is driven to readiness inside the request's own future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The clone that was (trivially) made ready goes with this request; keep a fresh one.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        match self.state.slots.clone().try_acquire_owned() {
            Ok(slot) => Box::pin(run(inner, req, slot)),
            Err(_) => {
                let queued = self.state.waiting.fetch_add(1, Ordering::Relaxed);
                let ticket = InQueue(self.state.clone());
                if queued >= self.state.queue_depth {
                    drop(ticket);
                    return Box::pin(async { Err(Box::new(Overloaded::new()) as BoxError) });
                }
                let slots = self.state.slots.clone();
                Box::pin(async move {
                    let slot = slots
                        .acquire_owned()
                        .await
                        .map_err(|e| Box::new(e) as BoxError)?;
                    drop(ticket);
                    run(inner, req, slot).await
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::time::Duration;
    use tokio::sync::Notify;

    type Gated = Pin<Box<dyn Future<Output = Result<u32, Infallible>> + Send>>;
    type Admitted = Pin<Box<dyn Future<Output = Result<u32, BoxError>> + Send>>;

    /// An admission layer over a service whose requests count themselves as started and then
    /// finish only when `release` is notified.
    struct Rig {
        layer: AdmissionLayer,
        release: Arc<Notify>,
        started: Arc<AtomicUsize>,
    }

    impl Rig {
        fn new(max_in_flight: usize, queue_depth: usize) -> Rig {
            Rig {
                layer: AdmissionLayer::new(max_in_flight, queue_depth),
                release: Arc::new(Notify::new()),
                started: Arc::new(AtomicUsize::new(0)),
            }
        }

        fn service(
            &self,
        ) -> impl Service<u32, Response = u32, Error = BoxError, Future = Admitted> + use<>
        {
            let (release, started) = (self.release.clone(), self.started.clone());
            self.layer.layer(tower::service_fn(move |n: u32| {
                let (release, started) = (release.clone(), started.clone());
                Box::pin(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                    Ok(n)
                }) as Gated
            }))
        }

        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }

        /// Wait (bounded) until `cond` holds; spawned requests need a moment to reach the gate.
        async fn until(&self, what: &str, cond: impl Fn(&Rig) -> bool) {
            for _ in 0..500 {
                if cond(self) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            panic!("timed out waiting until {what}");
        }
    }

    fn answer(r: Result<Result<u32, BoxError>, tokio::task::JoinError>) -> Option<u32> {
        r.ok().and_then(Result::ok)
    }

    #[tokio::test]
    async fn admits_queues_then_sheds() {
        let rig = Rig::new(2, 1);
        let mut svc = rig.service();

        let a = tokio::spawn(svc.call(1));
        let b = tokio::spawn(svc.call(2));
        let c = tokio::spawn(svc.call(3)); // queued
        rig.until("two requests run", |r| r.started() == 2).await;
        assert_eq!(rig.layer.waiting(), 1, "the third waits");

        let shed = svc.call(4).await.expect_err("queue full: shed");
        assert!(shed.downcast_ref::<Overloaded>().is_some(), "{shed}");
        assert_eq!(
            rig.layer.waiting(),
            1,
            "a shed request never counts as waiting"
        );

        // Finishing the running ones lets the queued one run.
        rig.release.notify_waiters();
        assert_eq!(answer(a.await), Some(1));
        assert_eq!(answer(b.await), Some(2));
        rig.until("the queued request runs", |r| r.started() == 3)
            .await;
        assert_eq!(rig.layer.waiting(), 0);
        rig.release.notify_waiters();
        assert_eq!(answer(c.await), Some(3));
    }

    #[tokio::test]
    async fn abandoned_waits_leave_the_queue() {
        let rig = Rig::new(1, 1);
        let mut svc = rig.service();
        let running = tokio::spawn(svc.call(1));
        rig.until("one request runs", |r| r.started() == 1).await;
        let waiting = svc.call(2);
        assert_eq!(rig.layer.waiting(), 1);
        drop(waiting); // e.g. the client's deadline passed
        assert_eq!(rig.layer.waiting(), 0);
        // The queue has room again.
        let queued = tokio::spawn(svc.call(3));
        rig.until("the new request queues", |r| r.layer.waiting() == 1)
            .await;
        rig.release.notify_waiters();
        assert_eq!(answer(running.await), Some(1));
        rig.until("the queued request runs", |r| r.started() == 2)
            .await;
        rig.release.notify_waiters();
        assert_eq!(answer(queued.await), Some(3));
    }

    #[tokio::test]
    async fn no_queue_sheds_when_full() {
        let rig = Rig::new(1, 0);
        let mut svc = rig.service();
        let running = tokio::spawn(svc.call(1));
        rig.until("one request runs", |r| r.started() == 1).await;
        assert!(svc.call(2).await.is_err());
        rig.release.notify_waiters();
        assert_eq!(answer(running.await), Some(1));
        // A slot is free again.
        let next = tokio::spawn(svc.call(3));
        rig.until("the next request runs", |r| r.started() == 2)
            .await;
        rig.release.notify_waiters();
        assert_eq!(answer(next.await), Some(3));
    }
}
