//! Admission control: at most `max_running` generations on the workers at once, at most
//! `max_queue` requests waiting for a slot, each waiting at most `queue_timeout`.
//!
//! A request that finds the queue full gets 429 with `Retry-After`; one that waits longer
//! than the timeout gets 503 with `Retry-After`. A permit is an RAII handle: dropping it (the
//! generation ended, or the client went away) admits the next waiter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

#[derive(Debug)]
pub(crate) struct Admission {
    sem: Arc<Semaphore>,
    max_running: usize,
    waiting: AtomicUsize,
    max_queue: usize,
    timeout: Duration,
}

/// Held while a generation runs.
#[derive(Debug)]
pub(crate) struct Permit {
    _permit: OwnedSemaphorePermit,
}

/// Decrements the waiting count however the wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why admission refused, for the metrics.
pub(crate) fn reason(e: &ApiError) -> &'static str {
    match e {
        ApiError::QueueFull { .. } => "queue_full",
        _ => "queue_timeout",
    }
}

impl Admission {
    pub fn new(max_running: usize, max_queue: usize, timeout: Duration) -> Self {
        let max_running = max_running.max(1);
        Self {
            sem: Arc::new(Semaphore::new(max_running)),
            max_running,
            waiting: AtomicUsize::new(0),
            max_queue,
            timeout,
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub fn running(&self) -> usize {
        self.max_running - self.sem.available_permits()
    }

    pub async fn admit(&self) -> Result<Permit, ApiError> {
        if let Ok(p) = Arc::clone(&self.sem).try_acquire_owned() {
            return Ok(Permit { _permit: p });
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if queued >= self.max_queue {
            return Err(ApiError::QueueFull { queued, retry_after_s: 1 });
        }
        match tokio::time::timeout(self.timeout, Arc::clone(&self.sem).acquire_owned()).await {
            Ok(Ok(p)) => Ok(Permit { _permit: p }),
            Ok(Err(_)) => Err(ApiError::Internal("admission closed".into())),
            Err(_) => Err(ApiError::Unavailable {
                message: format!(
                    "The request waited {:.1} s in the queue without a free slot; retry later.",
                    self.timeout.as_secs_f64()
                ),
                retry_after_s: 1,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_and_timeout() {
        let a = Arc::new(Admission::new(1, 1, Duration::from_millis(50)));
        let p = a.admit().await.unwrap();
        assert_eq!(a.running(), 1);
        let a2 = Arc::clone(&a);
        let waiter = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(a.waiting(), 1);
        assert!(matches!(a.admit().await, Err(ApiError::QueueFull { .. })));
        assert!(matches!(waiter.await.unwrap(), Err(ApiError::Unavailable { .. })));
        drop(p);
        assert!(a.admit().await.is_ok());
        assert_eq!(a.waiting(), 0);
    }
}
