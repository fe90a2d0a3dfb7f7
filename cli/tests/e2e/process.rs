//! One child process of a test: its output goes to a log file in the test's temp dir, signals
//! are sent with `kill(1)`, and dropping it kills and reaps it, so no process outlives a
//! failing test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running (or finished) child process and where its output went.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    /// stderr: the tracing log of `deepmad coordinator` and `deepmad worker`.
    pub log: PathBuf,
    /// stdout: the summary a worker prints when it stops.
    pub out: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `command` with stdout and stderr sent to `NAME.out` and `NAME.log` in `dir`.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = dir.join(format!("{name}.out"));
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("creating the stdout file"))
            .stderr(File::create(&log).expect("creating the log file"))
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Process {
            name: name.to_string(),
            child,
            log,
            out,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -s {signal} {} failed", self.name);
    }

    /// Kills the process with SIGKILL (`kill -9`) and reaps it.
    pub fn kill_hard(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Returns the exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait works");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit; panics naming it if it does not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "{} did not exit within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns everything the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Returns everything the process has written to stdout so far.
    pub fn out_text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Returns the last `lines` lines of the log and of stdout, for failure reports.
    pub fn tail(&self, lines: usize) -> String {
        let mut text = String::new();
        for (what, body) in [("stderr", self.log_text()), ("stdout", self.out_text())] {
            let all: Vec<&str> = body.lines().collect();
            let from = all.len().saturating_sub(lines);
            text.push_str(&format!(
                "---- {} {what} ({} lines, last {}) ----\n",
                self.name,
                all.len(),
                all.len() - from
            ));
            for line in &all[from..] {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process.
        self.kill_hard();
    }
}
