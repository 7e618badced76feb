//! The bounded frame queue between the ingest task (async, producer) and the inference workers
//! (OS threads, consumers).
//!
//! A plain `Mutex<VecDeque>` with a `Condvar` for workers and a `tokio::sync::Notify` for the
//! producer waiting for room under the `block` policy. Drop-oldest needs to evict from the
//! producer side, which off-the-shelf channels do not offer. The queue also counts frames a
//! worker has taken but not finished, so shutdown can tell when everything is served.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::DropPolicy;

/// Result of offering an item to the queue.
#[derive(Debug)]
pub enum Push<T> {
    /// Queued; nothing was lost.
    Queued,
    /// Queued, and this older item was evicted to make room (drop_oldest).
    Evicted(T),
    /// Not queued: the queue is full (drop_newest, or block that timed out). Item returned.
    Full(T),
    /// Not queued: the queue is closed for shutdown. Item returned.
    Closed(T),
}

/// Result of waiting for an item.
#[derive(Debug)]
pub enum Pop<T> {
    Item(T),
    /// Nothing arrived within the timeout (lets workers report liveness while idle).
    Timeout,
    /// Closed and empty: the worker should exit.
    Closed,
}

struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
    in_flight: usize,
}

/// Bounded multi-consumer queue with a drop policy.
pub struct FrameQueue<T> {
    inner: Mutex<Inner<T>>,
    not_empty: Condvar,
    /// Signalled whenever an item leaves the queue or an in-flight item completes.
    changed: Notify,
    capacity: usize,
    /// Effective capacity (<= `capacity`), lowered by the overload controller.
    limit: AtomicUsize,
    policy: DropPolicy,
}

impl<T> FrameQueue<T> {
    pub fn new(capacity: usize, policy: DropPolicy) -> Self {
        Self {
            inner: Mutex::new(Inner {
                items: VecDeque::with_capacity(capacity),
                closed: false,
                in_flight: 0,
            }),
            not_empty: Condvar::new(),
            changed: Notify::new(),
            capacity: capacity.max(1),
            limit: AtomicUsize::new(capacity.max(1)),
            policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A worker that panicked while holding the lock (it does not: no code under the lock
        // can panic) would poison it; the data is a plain queue, still consistent, so go on.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The effective capacity now (the configured one unless the controller lowered it).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Sets the effective capacity (clamped to 1..=capacity) and, when it shrank below what is
    /// queued, removes the oldest excess items (returned, for the caller to count).
    pub fn set_limit(&self, limit: usize) -> Vec<T> {
        let limit = limit.clamp(1, self.capacity);
        self.limit.store(limit, Ordering::Relaxed);
        let mut g = self.lock();
        let excess = g.items.len().saturating_sub(limit);
        if excess == 0 {
            return Vec::new();
        }
        let out: Vec<T> = g.items.drain(..excess).collect();
        drop(g);
        self.changed.notify_waiters();
        out
    }

    pub fn policy(&self) -> DropPolicy {
        self.policy
    }

    /// Frames waiting for a worker.
    pub fn depth(&self) -> usize {
        self.lock().items.len()
    }

    /// Frames taken by a worker and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Offers an item without waiting. Under `block` this behaves like drop_newest; use
    /// [`FrameQueue::push_wait`] to wait for room.
    pub fn push(&self, item: T) -> Push<T> {
        let mut g = self.lock();
        if g.closed {
            return Push::Closed(item);
        }
        if g.items.len() < self.limit.load(Ordering::Relaxed) {
            g.items.push_back(item);
            drop(g);
            self.not_empty.notify_one();
            return Push::Queued;
        }
        match self.policy {
            DropPolicy::DropOldest => {
                // Above the limit after it shrank: evict down to it (the excess is returned as
                // one eviction per push until the queue fits again).
                let old = g.items.pop_front();
                g.items.push_back(item);
                drop(g);
                self.not_empty.notify_one();
                match old {
                    Some(o) => Push::Evicted(o),
                    None => Push::Queued,
                }
            }
            DropPolicy::DropNewest | DropPolicy::Block => Push::Full(item),
        }
    }

    /// Offers an item, waiting up to `timeout` for room when full (the `block` policy).
    pub async fn push_wait(&self, item: T, timeout: Duration) -> Push<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut item = item;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register interest before re-checking, so a pop in between is not missed.
            notified.as_mut().enable();
            match self.push(item) {
                Push::Full(back) => item = back,
                other => return other,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.push(item);
            }
        }
    }

    /// Takes the next item, waiting up to `timeout`. The caller must call
    /// [`FrameQueue::done`] when finished with it.
    pub fn pop(&self, timeout: Duration) -> Pop<T> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if let Some(item) = g.items.pop_front() {
                g.in_flight += 1;
                drop(g);
                self.changed.notify_waiters();
                return Pop::Item(item);
            }
            if g.closed {
                return Pop::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Pop::Timeout;
            }
            g = self
                .not_empty
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Takes up to `max` more items without waiting (for a batch), appending them to `out`.
    /// Each must be finished with [`FrameQueue::done`] like a popped one.
    pub fn pop_more(&self, out: &mut Vec<T>, max: usize) {
        let mut g = self.lock();
        let n = max.min(g.items.len());
        if n == 0 {
            return;
        }
        out.extend(g.items.drain(..n));
        g.in_flight += n;
        drop(g);
        self.changed.notify_waiters();
    }

    /// Marks one popped item as finished.
    pub fn done(&self) {
        let mut g = self.lock();
        g.in_flight = g.in_flight.saturating_sub(1);
        drop(g);
        self.changed.notify_waiters();
    }

    /// Stops accepting items; workers drain what is queued, then see [`Pop::Closed`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.changed.notify_waiters();
    }

    /// Removes everything still queued (shutdown grace expired); returns the items.
    pub fn drain_remaining(&self) -> Vec<T> {
        let items: Vec<T> = self.lock().items.drain(..).collect();
        self.not_empty.notify_all();
        items
    }

    /// True when nothing is queued or in flight.
    pub fn is_idle(&self) -> bool {
        let g = self.lock();
        g.items.is_empty() && g.in_flight == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn drop_oldest_evicts_the_head() {
        let q = FrameQueue::new(2, DropPolicy::DropOldest);
        assert!(matches!(q.push(1), Push::Queued));
        assert!(matches!(q.push(2), Push::Queued));
        assert!(matches!(q.push(3), Push::Evicted(1)));
        assert!(matches!(q.pop(Duration::ZERO), Pop::Item(2)));
        assert!(matches!(q.pop(Duration::ZERO), Pop::Item(3)));
        assert!(matches!(q.pop(Duration::ZERO), Pop::Timeout));
    }

    #[test]
    fn a_lowered_limit_trims_the_oldest_and_bounds_new_pushes() {
        let q = FrameQueue::new(8, DropPolicy::DropOldest);
        for i in 0..6 {
            assert!(matches!(q.push(i), Push::Queued));
        }
        assert_eq!(q.set_limit(2), vec![0, 1, 2, 3]);
        assert_eq!((q.depth(), q.limit()), (2, 2));
        assert!(matches!(q.push(6), Push::Evicted(4)));
        assert_eq!(q.set_limit(100), Vec::<i32>::new());
        assert_eq!(q.limit(), 8, "clamped to the configured capacity");
        assert!(matches!(q.push(7), Push::Queued));
        assert_eq!(q.set_limit(0), vec![5, 6]);
        assert_eq!(q.limit(), 1, "never below one");
    }

    #[test]
    fn pop_more_takes_what_is_there_without_waiting() {
        let q = FrameQueue::new(8, DropPolicy::DropOldest);
        for i in 0..3 {
            q.push(i);
        }
        let mut out = vec![];
        assert!(matches!(q.pop(Duration::ZERO), Pop::Item(0)));
        q.pop_more(&mut out, 5);
        assert_eq!(out, vec![1, 2]);
        assert_eq!((q.depth(), q.in_flight()), (0, 3));
        q.pop_more(&mut out, 5);
        assert_eq!(out.len(), 2, "nothing left: returns at once");
        for _ in 0..3 {
            q.done();
        }
        assert!(q.is_idle());
    }

    #[test]
    fn drop_newest_refuses_the_new_item() {
        let q = FrameQueue::new(1, DropPolicy::DropNewest);
        assert!(matches!(q.push(1), Push::Queued));
        assert!(matches!(q.push(2), Push::Full(2)));
        assert_eq!(q.depth(), 1);
    }

    #[test]
    fn close_lets_workers_drain_then_stop() {
        let q = FrameQueue::new(4, DropPolicy::DropOldest);
        q.push(1);
        q.close();
        assert!(matches!(q.push(2), Push::Closed(2)));
        assert!(matches!(q.pop(Duration::ZERO), Pop::Item(1)));
        assert!(!q.is_idle(), "item 1 is in flight");
        q.done();
        assert!(q.is_idle());
        assert!(matches!(q.pop(Duration::from_secs(5)), Pop::Closed));
    }

    #[test]
    fn pop_wakes_when_an_item_arrives() {
        let q = Arc::new(FrameQueue::new(4, DropPolicy::DropOldest));
        let q2 = Arc::clone(&q);
        let t = std::thread::spawn(move || q2.pop(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        q.push(7);
        assert!(matches!(t.join().expect("thread"), Pop::Item(7)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn block_waits_for_room_then_times_out() {
        let q = Arc::new(FrameQueue::new(1, DropPolicy::Block));
        q.push(1);
        // Room appears after a worker pops: the blocked push succeeds.
        let q2 = Arc::clone(&q);
        let popper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            q2.pop(Duration::ZERO)
        });
        assert!(matches!(q.push_wait(2, Duration::from_secs(10)).await, Push::Queued));
        assert!(matches!(popper.join().expect("thread"), Pop::Item(1)));
        // Nobody pops: the push gives up after the timeout and returns the item.
        assert!(matches!(q.push_wait(3, Duration::from_millis(30)).await, Push::Full(3)));
    }
}
