//! `futures_timer::Delay` (the API of futures-timer 3.0.3) on tokio's timer. See README.md for
//! why foldmesh substitutes it.

#![deny(missing_docs)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Sleep};

/// A future that completes at a set time, like futures-timer's `Delay`.
pub struct Delay {
    sleep: Pin<Box<Sleep>>,
}

/// The runtime whose timer serves delays created outside any tokio runtime.
fn fallback() -> &'static Handle {
    static FALLBACK: OnceLock<Handle> = OnceLock::new();
    FALLBACK.get_or_init(|| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("futures-timer: cannot start a timer runtime: {e}"),
        };
        let handle = rt.handle().clone();
        let spawned = std::thread::Builder::new()
            .name("futures-timer".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()));
        if let Err(e) = spawned {
            panic!("futures-timer: cannot start the timer thread: {e}");
        }
        handle
    })
}

/// `now + dur`, saturating far in the future (futures-timer accepts any duration).
fn deadline(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        let at = deadline(dur);
        let sleep = match Handle::try_current() {
            Ok(_) => tokio::time::sleep_until(at),
            Err(_) => {
                let _entered = fallback().enter();
                tokio::time::sleep_until(at)
            }
        };
        Delay {
            sleep: Box::pin(sleep),
        }
    }

    /// Restart the delay so that it completes `dur` from now.
    pub fn reset(&mut self, dur: Duration) {
        self.sleep.as_mut().reset(deadline(dur));
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sleep.as_mut().poll(cx)
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay")
            .field("deadline", &self.sleep.deadline())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;

    #[tokio::test]
    async fn completes_after_its_duration_and_not_before() {
        let start = StdInstant::now();
        Delay::new(Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn reset_moves_the_deadline() {
        let mut d = Delay::new(Duration::from_secs(3600));
        d.reset(Duration::from_millis(10));
        let start = StdInstant::now();
        (&mut d).await;
        assert!(start.elapsed() < Duration::from_secs(60));
        // Reset after completion arms it again.
        d.reset(Duration::from_millis(20));
        let start = StdInstant::now();
        d.await;
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn pending_until_the_deadline() {
        let mut d = Delay::new(Duration::from_secs(3600));
        let polled = futures::poll!(&mut d);
        assert!(polled.is_pending());
    }

    #[test]
    fn works_outside_a_tokio_runtime() {
        let start = StdInstant::now();
        futures::executor::block_on(Delay::new(Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn huge_durations_do_not_overflow() {
        let mut d = Delay::new(Duration::MAX);
        assert!(futures::poll!(&mut d).is_pending());
        d.reset(Duration::MAX);
        assert!(futures::poll!(&mut d).is_pending());
    }
}
