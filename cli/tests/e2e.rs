//! End-to-end and fault tests of issue 6: real `deepmad` processes (one coordinator, worker
//! processes) on 127.0.0.1, on a fresh PostgreSQL database per test (the server at
//! `DEEPMAD_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//!
//! * `happy`: two workers run a small sweep to a full leaderboard.
//! * `faults`: a worker killed with SIGKILL, the coordinator restarted with SIGTERM, a worker
//!   paused with SIGSTOP past its lease, a sweep cancelled while it trains.
//! * `outage`: the database (a private PostgreSQL server the test starts) stops and restarts.
//! * `hostile`: wrong tokens, malformed protobuf, oversized messages, absurd sweeps.
//! * `downstream`: a linear probe and a fine-tune of every trained backbone, leased to any
//!   worker, the weights passed through the coordinator.
//! * `embedded`: `deepmad run` on SQLite: a sweep interrupted with SIGINT, resumed, reused.
//!
//! The harness (`e2e/harness.rs`) keeps each process's log in the test's temp dir, prints
//! every log tail when a test fails, and kills every process it started. Tests that train
//! run one at a time. Timeouts are upper bounds for waiting, never assertions about speed.

#[path = "e2e/api.rs"]
mod api;
#[path = "e2e/checks.rs"]
mod checks;
#[path = "e2e/data.rs"]
mod data;
#[path = "e2e/harness.rs"]
mod harness;
#[path = "e2e/postgres.rs"]
mod postgres;
#[path = "e2e/process.rs"]
mod process;

#[path = "e2e/downstream.rs"]
mod downstream;
#[path = "e2e/embedded.rs"]
mod embedded;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/happy.rs"]
mod happy;
#[path = "e2e/hostile.rs"]
mod hostile;
#[path = "e2e/outage.rs"]
mod outage;
