//! Prometheus metrics of the work protocol, served as text on `GET /metrics`.
//!
//! [`Metrics`] is a set of counters, gauges and one histogram that the service layer updates
//! (`lease_granted`, `reaped`, `completed`, ...); [`Metrics::render`] writes the Prometheus
//! text exposition format (version 0.0.4) by hand, which keeps this dependency-free.
//! [`metrics_router`] and [`serve_metrics`] serve it in two steps, like the gRPC server.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::header;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::model::FailureClass;
use crate::store::{CompleteOutcome, TrialCounts};

/// Upper bounds (seconds) of the trial-duration histogram: a minute to a day.
const DURATION_BUCKETS: [f64; 12] = [
    60.0,
    300.0,
    600.0,
    1_200.0,
    1_800.0,
    3_600.0,
    7_200.0,
    14_400.0,
    28_800.0,
    43_200.0,
    86_400.0,
    f64::INFINITY,
];

const FAILURE_CLASSES: [FailureClass; 3] = [
    FailureClass::Deterministic,
    FailureClass::Retryable,
    FailureClass::Lost,
];

const OUTCOMES: [CompleteOutcome; 3] = [
    CompleteOutcome::Recorded,
    CompleteOutcome::Duplicate,
    CompleteOutcome::Late,
];

fn class_index(class: FailureClass) -> usize {
    match class {
        FailureClass::Deterministic => 0,
        FailureClass::Retryable => 1,
        FailureClass::Lost => 2,
    }
}

fn outcome_index(outcome: CompleteOutcome) -> usize {
    match outcome {
        CompleteOutcome::Recorded => 0,
        CompleteOutcome::Duplicate => 1,
        CompleteOutcome::Late => 2,
    }
}

fn outcome_name(outcome: CompleteOutcome) -> &'static str {
    match outcome {
        CompleteOutcome::Recorded => "recorded",
        CompleteOutcome::Duplicate => "duplicate",
        CompleteOutcome::Late => "late",
    }
}

/// A cumulative histogram: counts per upper bound, their sum and their count.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// The coordinator's metrics; shared as `Arc<Metrics>`, updated without blocking.
#[derive(Debug, Default)]
pub struct Metrics {
    leases_granted: AtomicU64,
    heartbeats: AtomicU64,
    reaped: AtomicU64,
    failures: [AtomicU64; 3],
    completions: [AtomicU64; 3],
    queue: Mutex<TrialCounts>,
    trial_durations: Mutex<Histogram>,
    watch_streams: Arc<AtomicU64>,
    grid_points_solved: AtomicU64,
}

/// One open `WatchSweep` stream's share of the `deepmad_watch_streams` gauge, given back when
/// its poller ends.
#[derive(Debug)]
pub struct WatchStream(Arc<AtomicU64>);

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Returns metrics at zero.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Counts a lease handed to a worker.
    pub fn lease_granted(&self) {
        self.leases_granted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a heartbeat received.
    pub fn heartbeat(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `count` expired leases returned to the queue by the reaper.
    pub fn reaped(&self, count: u32) {
        self.reaped.fetch_add(u64::from(count), Ordering::Relaxed);
    }

    /// Counts a failed attempt by its class (each may lead to a retry).
    pub fn retried(&self, class: FailureClass) {
        self.failures[class_index(class)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a completion report by what it did.
    pub fn completed(&self, outcome: CompleteOutcome) {
        self.completions[outcome_index(outcome)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records a finished trial's training time. Negative or non-finite values are ignored.
    pub fn trial_duration(&self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let mut histogram = self
            .trial_durations
            .lock()
            .expect("metrics lock not poisoned");
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .expect("the last bucket is +Inf");
        histogram.buckets[bucket] += 1;
        histogram.sum += seconds;
        histogram.count += 1;
    }

    /// Counts one grid point solved for a sweep being created.
    pub fn grid_point_solved(&self) {
        self.grid_points_solved.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns how many grid points have been solved.
    pub fn grid_points_solved(&self) -> u64 {
        self.grid_points_solved.load(Ordering::Relaxed)
    }

    /// Counts a `WatchSweep` poller until the returned value is dropped.
    pub fn watch_started(&self) -> WatchStream {
        self.watch_streams.fetch_add(1, Ordering::Relaxed);
        WatchStream(self.watch_streams.clone())
    }

    /// Returns how many `WatchSweep` pollers are running.
    pub fn watch_streams(&self) -> u64 {
        self.watch_streams.load(Ordering::Relaxed)
    }

    /// Sets the trial counts by state (the queue-depth gauges).
    pub fn set_queue(&self, counts: TrialCounts) {
        *self.queue.lock().expect("metrics lock not poisoned") = counts;
    }

    /// Returns every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_queue(&mut out);
        counter(
            &mut out,
            "deepmad_leases_granted_total",
            "Leases handed to workers.",
            &self.leases_granted,
        );
        counter(
            &mut out,
            "deepmad_heartbeats_total",
            "Heartbeats received.",
            &self.heartbeats,
        );
        counter(
            &mut out,
            "deepmad_grid_points_solved_total",
            "Grid points solved for sweeps being created.",
            &self.grid_points_solved,
        );
        counter(
            &mut out,
            "deepmad_leases_reaped_total",
            "Expired leases returned to the queue.",
            &self.reaped,
        );
        header_lines(
            &mut out,
            "deepmad_attempt_failures_total",
            "Failed attempts by failure class.",
            "counter",
        );
        for class in FAILURE_CLASSES {
            let value = self.failures[class_index(class)].load(Ordering::Relaxed);
            writeln!(
                out,
                "deepmad_attempt_failures_total{{class=\"{class}\"}} {value}"
            )
            .expect("writing to a String");
        }
        header_lines(
            &mut out,
            "deepmad_completions_total",
            "Completion reports by outcome.",
            "counter",
        );
        for outcome in OUTCOMES {
            let value = self.completions[outcome_index(outcome)].load(Ordering::Relaxed);
            let name = outcome_name(outcome);
            writeln!(
                out,
                "deepmad_completions_total{{outcome=\"{name}\"}} {value}"
            )
            .expect("writing to a String");
        }
        self.render_durations(&mut out);
        header_lines(
            &mut out,
            "deepmad_watch_streams",
            "WatchSweep streams whose poller runs.",
            "gauge",
        );
        writeln!(out, "deepmad_watch_streams {}", self.watch_streams())
            .expect("writing to a String");
        out
    }

    fn render_queue(&self, out: &mut String) {
        let counts = *self.queue.lock().expect("metrics lock not poisoned");
        header_lines(out, "deepmad_trials", "Trials by state.", "gauge");
        let states = [
            ("queued", counts.queued),
            ("running", counts.running),
            ("succeeded", counts.succeeded),
            ("failed", counts.failed),
            ("dead", counts.dead),
        ];
        for (state, value) in states {
            writeln!(out, "deepmad_trials{{state=\"{state}\"}} {value}")
                .expect("writing to a String");
        }
    }

    fn render_durations(&self, out: &mut String) {
        let histogram = self
            .trial_durations
            .lock()
            .expect("metrics lock not poisoned");
        let name = "deepmad_trial_duration_seconds";
        header_lines(out, name, "Training time of recorded trials.", "histogram");
        let mut cumulative = 0;
        for (bound, count) in DURATION_BUCKETS.iter().zip(histogram.buckets) {
            cumulative += count;
            let le = if bound.is_infinite() {
                "+Inf".to_string()
            } else {
                bound.to_string()
            };
            writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}")
                .expect("writing to a String");
        }
        writeln!(out, "{name}_sum {}", histogram.sum).expect("writing to a String");
        writeln!(out, "{name}_count {}", histogram.count).expect("writing to a String");
    }
}

fn header_lines(out: &mut String, name: &str, help: &str, kind: &str) {
    writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}").expect("writing to a String");
}

fn counter(out: &mut String, name: &str, help: &str, value: &AtomicU64) {
    header_lines(out, name, help, "counter");
    writeln!(out, "{name} {}", value.load(Ordering::Relaxed)).expect("writing to a String");
}

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Returns the HTTP routes of the metrics endpoint: `GET /metrics`.
pub fn metrics_router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let body = metrics.render();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], body) }
        }),
    )
}

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight scrapes
/// finish.
pub async fn serve_metrics(
    listener: TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_value(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
        line[series.len()..].trim().parse().unwrap()
    }

    #[test]
    fn counters_count() {
        let metrics = Metrics::new();
        metrics.lease_granted();
        metrics.lease_granted();
        metrics.heartbeat();
        metrics.reaped(3);
        metrics.retried(FailureClass::Retryable);
        metrics.completed(CompleteOutcome::Late);
        metrics.completed(CompleteOutcome::Recorded);
        let text = metrics.render();
        assert_eq!(line_value(&text, "deepmad_leases_granted_total"), 2.0);
        assert_eq!(line_value(&text, "deepmad_heartbeats_total"), 1.0);
        assert_eq!(line_value(&text, "deepmad_leases_reaped_total"), 3.0);
        assert_eq!(
            line_value(&text, "deepmad_attempt_failures_total{class=\"retryable\"}"),
            1.0
        );
        assert_eq!(
            line_value(&text, "deepmad_attempt_failures_total{class=\"lost\"}"),
            0.0
        );
        assert_eq!(
            line_value(&text, "deepmad_completions_total{outcome=\"late\"}"),
            1.0
        );
        assert_eq!(
            line_value(&text, "deepmad_completions_total{outcome=\"duplicate\"}"),
            0.0
        );
    }

    #[test]
    fn queue_gauges_show_the_last_counts() {
        let metrics = Metrics::new();
        metrics.set_queue(TrialCounts {
            queued: 7,
            running: 2,
            succeeded: 1,
            failed: 0,
            dead: 4,
        });
        let text = metrics.render();
        assert_eq!(line_value(&text, "deepmad_trials{state=\"queued\"}"), 7.0);
        assert_eq!(line_value(&text, "deepmad_trials{state=\"dead\"}"), 4.0);
        assert!(text.contains("# TYPE deepmad_trials gauge"));
    }

    #[test]
    fn the_histogram_is_cumulative() {
        let metrics = Metrics::new();
        for seconds in [30.0, 250.0, 300.0, 100_000.0, f64::NAN, -1.0] {
            metrics.trial_duration(seconds);
        }
        let text = metrics.render();
        let name = "deepmad_trial_duration_seconds";
        assert_eq!(
            line_value(&text, &format!("{name}_bucket{{le=\"60\"}}")),
            1.0
        );
        assert_eq!(
            line_value(&text, &format!("{name}_bucket{{le=\"300\"}}")),
            3.0
        );
        assert_eq!(
            line_value(&text, &format!("{name}_bucket{{le=\"86400\"}}")),
            3.0
        );
        assert_eq!(
            line_value(&text, &format!("{name}_bucket{{le=\"+Inf\"}}")),
            4.0
        );
        assert_eq!(line_value(&text, &format!("{name}_count")), 4.0);
        assert_eq!(line_value(&text, &format!("{name}_sum")), 100_580.0);
    }
}
