//! A [`Cluster`]: one coordinator process (restartable) on a PostgreSQL database and any number
//! of worker processes, all `deepmad` binaries on 127.0.0.1, with their logs in a temp dir.
//! Dropping it kills every process; if the test is failing, it first prints every process's
//! log tail, so a failure can be diagnosed from the test output alone.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use deepmad_proto::v1;
use sqlx::postgres::{PgPool, PgPoolOptions};

use super::api::Api;
use super::process::Process;

/// The `deepmad` binary under test.
pub const DEEPMAD: &str = env!("CARGO_BIN_EXE_deepmad");

/// The longest any test waits for one condition: generous, for a loaded two-core machine.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// The lease protocol's timings for every test: short leases, fast heartbeats and reaper, and
/// almost no backoff before a reaped trial is leased again.
const LEASE_SETTINGS: [(&str, &str); 5] = [
    ("DEEPMAD__LEASE__LEASE_MS", "2000"),
    ("DEEPMAD__LEASE__HEARTBEAT_INTERVAL_MS", "200"),
    ("DEEPMAD__LEASE__REAPER_INTERVAL_MS", "300"),
    ("DEEPMAD__RETRY__BACKOFF_BASE_MS", "10"),
    ("DEEPMAD__RETRY__BACKOFF_MAX_MS", "50"),
];

/// Tests that train run one at a time: on two cores, two of them side by side would starve
/// each other's heartbeats and make lease expiry a matter of luck.
static TRAINING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the other training tests to finish; hold the guard for the whole test.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    TRAINING.lock().await
}

/// Returns a port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("a local address").port()
}

/// Polls `probe` every 100 ms until it returns `Some`, for at most [`PATIENCE`]; panics
/// naming `what` when it never does.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a finished `deepmad` command left.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// What `deepmad sweep create` reported.
#[derive(Debug)]
pub struct Created {
    pub id: String,
    pub designs: u32,
    pub trials: u32,
}

/// The processes of one test and the database they share.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub database_url: String,
    pub address: SocketAddr,
    settings: Vec<(String, String)>,
    /// The token clients (the CLI, [`Api`]) send, and the one workers send.
    pub client_token: Option<String>,
    pub worker_token: Option<String>,
    /// Every coordinator started, the current one last.
    coordinators: Vec<Process>,
    pub workers: Vec<Process>,
    pool: Option<PgPool>,
}

impl Cluster {
    /// Returns a cluster on `database_url` whose coordinator gets the lease settings plus
    /// `settings` (`DEEPMAD__...` variables); nothing runs yet.
    pub fn new(database_url: &str, settings: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("deepmad-e2e-")
            .tempdir()
            .expect("a temp dir");
        let port = free_port();
        let weights_dir = dir.path().join("deepmad-weights").display().to_string();
        Cluster {
            dir,
            database_url: database_url.to_string(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            settings: LEASE_SETTINGS
                .iter()
                .chain(settings)
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .chain([("DEEPMAD__STORAGE__WEIGHTS_DIR".to_string(), weights_dir)])
                .collect(),
            client_token: None,
            worker_token: None,
            coordinators: Vec::new(),
            workers: Vec::new(),
            pool: None,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url(), self.client_token.as_deref())
    }

    /// Starts a coordinator process on the cluster's port and waits until it serves.
    pub async fn start_coordinator(&mut self) {
        let name = format!("coordinator-{}", self.coordinators.len() + 1);
        let mut command = deepmad_command();
        command
            .args(["coordinator", "--database", &self.database_url])
            .args(["--listen", &self.address.to_string()])
            .envs(self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.coordinators
            .push(Process::spawn(&name, command, self.dir.path()));
        let coordinator = self.coordinators.last_mut().expect("just pushed");
        wait_for(&format!("{name} to serve"), || {
            let exited = coordinator.exited();
            assert!(exited.is_none(), "{name} exited early: {exited:?}");
            let serving = coordinator.log_text().contains("coordinator serving");
            std::future::ready(serving.then_some(()))
        })
        .await;
    }

    /// The coordinator started last.
    pub fn coordinator(&mut self) -> &mut Process {
        self.coordinators
            .last_mut()
            .expect("a coordinator was started")
    }

    /// Starts a worker process named `name` (its work dir is `work-NAME`); returns its index.
    pub fn start_worker(&mut self, name: &str) -> usize {
        let token = self.worker_token.clone();
        self.start_worker_with_token(name, token.as_deref())
    }

    /// Starts a worker that sends `token` (or none).
    pub fn start_worker_with_token(&mut self, name: &str, token: Option<&str>) -> usize {
        // Retry an unreachable coordinator after 100 ms, at most 2 s apart (the defaults,
        // 500 ms doubling to 30 s, would make the restart and outage tests slow).
        let config = self.path("worker.toml");
        std::fs::write(&config, "backoff_min_ms = 100\nbackoff_max_ms = 2000\n")
            .expect("writing the worker settings");
        let mut command = deepmad_command();
        command
            .args(["worker", "--coordinator", &self.url(), "--device", "cpu"])
            .args(["--name", name, "--config"])
            .arg(&config)
            .arg("--work-dir")
            .arg(self.path(&format!("work-{name}")))
            // One kernel thread per worker: two workers and a coordinator share two cores.
            .env("CANDLE_NUM_THREADS", "1")
            .env("RAYON_NUM_THREADS", "1");
        if let Some(token) = token {
            command.env("DEEPMAD_TOKEN", token);
        }
        self.workers.push(Process::spawn(
            &format!("worker-{name}"),
            command,
            self.dir.path(),
        ));
        self.workers.len() - 1
    }

    /// Returns the worker id that worker `index` registered with (from its log).
    pub async fn worker_id(&self, index: usize) -> String {
        let worker = &self.workers[index];
        wait_for(&format!("{} to register", worker.name), || {
            let id = worker
                .log_text()
                .lines()
                .find(|line| line.contains("worker registered"))
                .and_then(|line| field(line, "worker_id"));
            std::future::ready(id)
        })
        .await
    }

    /// Runs `deepmad ARGS` as a client of this cluster (`DEEPMAD_COORDINATOR`, and
    /// `DEEPMAD_TOKEN` when a client token is set).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_with_token(args, self.client_token.as_deref())
    }

    pub fn cli_with_token(&self, args: &[&str], token: Option<&str>) -> CliOutput {
        let mut command = deepmad_command();
        command.args(args).env("DEEPMAD_COORDINATOR", self.url());
        if let Some(token) = token {
            command.env("DEEPMAD_TOKEN", token);
        }
        let output = command.output().expect("the deepmad binary runs");
        CliOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert_eq!(
            output.code,
            Some(0),
            "deepmad {args:?} failed:\n{}",
            output.stderr
        );
        output.stdout
    }

    /// Runs a command that prints JSON; returns the parsed value.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let stdout = self.cli_ok(args);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("deepmad {args:?}: not JSON ({error}):\n{stdout}"))
    }

    /// Writes `toml` to a file and creates the sweep with `deepmad sweep create`.
    pub fn create_sweep(&self, toml: &str) -> Created {
        let file = self.path(&format!("sweep-{}.toml", super::postgres::unique_suffix()));
        std::fs::write(&file, toml).expect("writing the sweep file");
        let stdout = self.cli_ok(&["sweep", "create", file.to_str().expect("UTF-8 path")]);
        let number = |after: &str| -> u32 {
            stdout
                .split(after)
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse().ok())
                .unwrap_or_else(|| panic!("no {after:?} in:\n{stdout}"))
        };
        let id = stdout
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("sweep "))
            .unwrap_or_else(|| panic!("no sweep id in:\n{stdout}"))
            .trim()
            .to_string();
        Created {
            id,
            designs: number("distinct designs "),
            trials: number("trials: new "),
        }
    }

    /// Waits until no trial of the sweep is queued or running; returns its summary.
    pub async fn wait_sweep_done(&self, sweep: &str) -> v1::SweepSummary {
        let api = &self.api();
        wait_for(&format!("sweep {sweep} to finish"), || async move {
            let summary = api.sweep(sweep).await.ok()?;
            let counts = summary.counts?;
            (counts.queued + counts.running == 0).then_some(summary)
        })
        .await
    }

    /// Waits until the log of `process` (a worker index, or `None`: the coordinator) holds
    /// `needle`.
    pub async fn wait_log(&self, process: Option<usize>, needle: &str) {
        let process = match process {
            Some(index) => &self.workers[index],
            None => self.coordinators.last().expect("a coordinator was started"),
        };
        wait_for(
            &format!("{needle:?} in the log of {}", process.name),
            || std::future::ready(process.log_text().contains(needle).then_some(())),
        )
        .await
    }

    /// Returns a connection pool on the cluster's database, for SQL checks.
    pub async fn sql(&mut self) -> PgPool {
        if self.pool.is_none() {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&self.database_url)
                .await
                .expect("connecting to the test database");
            self.pool = Some(pool);
        }
        self.pool.clone().expect("just set")
    }

    /// Sends SIGTERM to every worker and returns each one's summary line
    /// (`trials completed C, failed F, stopped S`) as `[C, F, S]`.
    pub async fn stop_workers(&mut self) -> Vec<[u32; 3]> {
        for worker in &mut self.workers {
            if worker.exited().is_none() {
                worker.signal("TERM");
            }
        }
        let mut summaries = Vec::new();
        for worker in &mut self.workers {
            let status = worker.wait_exit(PATIENCE).await;
            assert!(status.success(), "{} exited with {status}", worker.name);
            summaries.push(summary_of(&worker.out_text()));
        }
        summaries
    }

    /// Prints every process's log tail (and the temp dir's path).
    pub fn dump_logs(&self) {
        eprintln!("==== e2e logs in {} ====", self.dir.path().display());
        for process in self.coordinators.iter().chain(&self.workers) {
            eprintln!("{}", process.tail(150));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing {
            self.dump_logs();
        }
        // Keep the logs and data of a failing test (or of every test, with
        // DEEPMAD_E2E_KEEP=1) for a look after the run.
        if failing || std::env::var_os("DEEPMAD_E2E_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temp dir"));
            eprintln!("kept {}", dir.keep().display());
        }
        for process in self.workers.iter_mut().chain(&mut self.coordinators) {
            process.kill_hard();
        }
    }
}

/// Returns `[completed, failed, stopped]` from a worker's final stdout line.
fn summary_of(out: &str) -> [u32; 3] {
    let numbers: Vec<u32> = out
        .lines()
        .find(|line| line.starts_with("trials completed"))
        .unwrap_or_else(|| panic!("no summary in the worker's output: {out:?}"))
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect();
    numbers
        .try_into()
        .unwrap_or_else(|_| panic!("not a summary: {out:?}"))
}

/// Returns the value of `name=VALUE` in a log line.
pub fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Some(value.trim_matches('"').to_string())
}

/// A `deepmad` command with a clean environment for this project: plain logs, info level, no
/// settings inherited from whoever runs the tests.
fn deepmad_command() -> Command {
    let mut command = Command::new(DEEPMAD);
    for (key, _) in std::env::vars_os() {
        if key
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("DEEPMAD")
        {
            command.env_remove(key);
        }
    }
    command.env("NO_COLOR", "1").env("RUST_LOG", "info");
    command
}
