//! PostgreSQL for the tests: [`TestDatabase`], a fresh database per test on the shared server
//! (`DEEPMAD_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`, as in
//! `coordinator/tests/store.rs`), and [`PrivateServer`], a server of the test's own that the
//! database-outage test stops and starts.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use sqlx::Connection;

/// The shared server's admin URL.
pub fn shared_admin_url() -> String {
    std::env::var("DEEPMAD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A uniquely named database, dropped (with its connections) when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDatabase {
    /// Creates a fresh database on the server at `admin_url`.
    pub async fn create(admin_url: &str) -> TestDatabase {
        let name = format!(
            "deepmad_e2e_{}_{}",
            std::process::id(),
            unique_suffix().replace('-', "_")
        );
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "PostgreSQL is not reachable at {admin_url} ({error}); start it with \
                     `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                )
            });
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("the test role may create databases");
        let _ = admin.close().await;
        let (server, _) = admin_url
            .rsplit_once('/')
            .expect("the admin url names a database");
        TestDatabase {
            admin_url: admin_url.to_string(),
            url: format!("{server}/{name}"),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside the test's runtime, which cannot block on another future: use a
        // thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            eprintln!("warning: test database {} was not dropped", self.name);
        }
    }
}

/// Returns a short string unique within this test process.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .subsec_nanos();
    format!("{}-{nanos}", NEXT.fetch_add(1, Ordering::SeqCst))
}

/// A PostgreSQL server of the test's own, in a temp dir, on a free port: `initdb`, then
/// `pg_ctl start` / `stop` as often as the test likes. PostgreSQL refuses to run as root, so
/// as root every command runs as the `postgres` user (`runuser -u postgres --`) in a dir that
/// user owns. Dropping it stops the server at once and removes the dir.
#[derive(Debug)]
pub struct PrivateServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl PrivateServer {
    /// Creates the cluster and starts it; panics with the reason if that is impossible here.
    pub fn start() -> PrivateServer {
        let bin = server_binaries();
        let dir = tempfile::Builder::new()
            .prefix("deepmad-e2e-pg-")
            .tempdir()
            .expect("a temp dir for the server");
        let as_postgres_user = running_as_root();
        if as_postgres_user {
            run(Command::new("chown").arg("postgres:").arg(dir.path()));
        }
        let server = PrivateServer {
            dir,
            bin,
            port: super::harness::free_port(),
            as_postgres_user,
        };
        run(server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"]));
        server.resume();
        server
    }

    /// The admin URL (database `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]));
    }

    /// Stops the server (fast mode: open sessions are terminated) and waits until it is down.
    pub fn pause(&self) {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-m", "fast", "stop"]));
    }

    /// Returns the server's own log, for failure reports.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        };
        command.stdin(Stdio::null());
        command
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- private PostgreSQL log ----\n{}", self.log_text());
        }
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}

/// Returns the newest `/usr/lib/postgresql/*/bin` that has `initdb` and `pg_ctl` (or
/// `DEEPMAD_TEST_POSTGRES_BIN`).
fn server_binaries() -> PathBuf {
    if let Ok(bin) = std::env::var("DEEPMAD_TEST_POSTGRES_BIN") {
        return PathBuf::from(bin);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin; \
             install the server or set DEEPMAD_TEST_POSTGRES_BIN"
        )
    })
}

fn running_as_root() -> bool {
    let output = Command::new("id").arg("-u").output().expect("id(1) runs");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// Runs a setup command; panics with its output if it fails.
fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
