//! Loading ahead of the model: a thread that makes items (batches) in order into a bounded
//! channel, so augmentation overlaps the forward and backward passes and memory stays bounded.
//!
//! Dropping the [`Prefetcher`] closes the channel, which stops the thread at its next send; the
//! drop waits for it. Batches are made on a plain OS thread, never on an async runtime.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use crate::error::WorkerError;

/// Items `range` made by `make(index)` on a background thread, at most `depth` ahead.
#[derive(Debug)]
pub struct Prefetcher<T> {
    receiver: Option<Receiver<T>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts the thread; `depth` (at least 1) bounds the items made but not yet taken.
    pub fn spawn(
        depth: usize,
        range: Range<usize>,
        make: impl Fn(usize) -> T + Send + 'static,
    ) -> Result<Prefetcher<T>, WorkerError> {
        let (sender, receiver) = sync_channel(depth.max(1));
        let remaining = range.len();
        let handle = std::thread::Builder::new()
            .name("deepmad-prefetch".into())
            .spawn(move || {
                for index in range {
                    if sender.send(make(index)).is_err() {
                        // The consumer is gone (stopped or cancelled): nothing left to do.
                        return;
                    }
                }
            })
            .map_err(|error| WorkerError::Loader {
                reason: format!("cannot start the loader thread: {error}"),
            })?;
        Ok(Prefetcher {
            receiver: Some(receiver),
            handle: Some(handle),
            remaining,
        })
    }

    /// Returns the next item; an error if the thread died before making all of them.
    pub fn next_item(&mut self) -> Result<Option<T>, WorkerError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let receiver = self
            .receiver
            .as_ref()
            .expect("the receiver lives until drop");
        match receiver.recv() {
            Ok(item) => {
                self.remaining -= 1;
                Ok(Some(item))
            }
            Err(_) => Err(WorkerError::Loader {
                reason: self.join_failure(),
            }),
        }
    }

    /// Joins the finished thread and describes how it ended.
    fn join_failure(&mut self) -> String {
        let Some(handle) = self.handle.take() else {
            return "the loader thread is gone".into();
        };
        match handle.join() {
            Ok(()) => "the loader thread stopped early".into(),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                format!("the loader thread panicked: {message}")
            }
        }
    }
}

impl<T> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        // Close the channel first so a producer blocked on a full channel wakes up and exits.
        self.receiver.take();
        if let Some(handle) = self.handle.take() {
            // A panic was already reported by `next_item`, or nobody is left to tell.
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn yields_items_in_order_then_none() {
        let mut prefetcher = Prefetcher::spawn(2, 3..7, |index| index * 10).unwrap();
        let mut got = Vec::new();
        while let Some(item) = prefetcher.next_item().unwrap() {
            got.push(item);
        }
        assert_eq!(got, vec![30, 40, 50, 60]);
    }

    #[test]
    fn stays_within_depth_and_stops_when_dropped() {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&made);
        let mut prefetcher = Prefetcher::spawn(2, 0..1000, move |index| {
            counter.fetch_add(1, Ordering::SeqCst);
            index
        })
        .unwrap();
        assert_eq!(prefetcher.next_item().unwrap(), Some(0));
        // Let the producer fill the channel; it then blocks.
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Taken 1, queued at most 2, and at most one more made and waiting to be sent.
        assert!(
            made.load(Ordering::SeqCst) <= 4,
            "{}",
            made.load(Ordering::SeqCst)
        );
        drop(prefetcher); // joins: must not hang on the blocked producer
        assert!(made.load(Ordering::SeqCst) < 1000);
    }

    #[test]
    fn a_panicking_loader_is_an_error_not_a_hang() {
        let mut prefetcher = Prefetcher::spawn(1, 0..3, |index| {
            assert!(index < 1, "bad image {index}");
            index
        })
        .unwrap();
        assert_eq!(prefetcher.next_item().unwrap(), Some(0));
        let message = prefetcher.next_item().unwrap_err().to_string();
        assert!(message.contains("bad image 1"), "{message}");
    }
}
