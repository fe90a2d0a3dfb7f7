//! The web dashboard end to end: a real coordinator on an SQLite file serving gRPC and the
//! dashboard on 127.0.0.1:0, a sweep whose trials were leased and completed through the
//! `Coordinator` use cases (as a worker's reports would be), then
//! - HTTP: status codes, auth (client token, worker token, cookie, `?token=`), 404s, JSON
//!   shapes, escaping, over a small HTTP/1.1 client on a `TcpStream`;
//! - a browser: headless Chromium (Debian's `chromium`; `DEEPMAD_CHROMIUM` names another)
//!   loads a sweep's page through a `?token=` link, runs its script, and the dumped DOM and a
//!   screenshot are checked. Without Chromium this part fails under CI (`CI` set) and is
//!   skipped, loudly, elsewhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deepmad_coordinator::app::{self, Listeners};
use deepmad_coordinator::model::{SweepId, WorkerId};
use deepmad_coordinator::service::Coordinator;
use deepmad_coordinator::settings::{self, Overrides};
use deepmad_coordinator::store::{EpochMetrics, FinalMetrics, NewWorker};
use deepmad_coordinator::sweep::SweepSpec;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const WORKER_TOKEN: &str = "worker-token-0123456789";
const CLIENT_TOKEN: &str = "client-token-0123456789";

/// A sweep name with markup in it: every page must show it escaped.
const SWEEP_NAME: &str = "rho <b>sweep</b> & \"friends\"";
const SWEEP_NAME_ESCAPED: &str = "rho &lt;b&gt;sweep&lt;/b&gt; &amp; &quot;friends&quot;";

/// Epochs each fake trial reports.
const EPOCHS: i32 = 3;

/// How long one Chromium run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

struct Running {
    dashboard: SocketAddr,
    coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(with_tokens: bool) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        database_url: Some(format!(
            "sqlite://{}",
            dir.path().join("deepmad.db").display()
        )),
    };
    let mut env = vec![(
        "DEEPMAD__DASHBOARD__LISTEN".to_string(),
        "127.0.0.1:0".to_string(),
    )];
    if with_tokens {
        env.push(("DEEPMAD__AUTH__WORKER_TOKENS".into(), WORKER_TOKEN.into()));
        env.push(("DEEPMAD__AUTH__CLIENT_TOKENS".into(), CLIENT_TOKEN.into()));
    }
    env.push((
        "DEEPMAD__STORAGE__WEIGHTS_DIR".into(),
        dir.path().join("weights").display().to_string(),
    ));
    let settings = settings::load(None, env, &overrides).unwrap();
    let grpc = TcpListener::bind(settings.listen).await.unwrap();
    let dashboard_listener = TcpListener::bind(settings.dashboard_listen.expect("set above"))
        .await
        .unwrap();
    let dashboard = dashboard_listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let coordinator = app::open(&settings, shutdown.clone()).await.unwrap();
    let serving = coordinator.clone();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let listeners = Listeners {
            grpc,
            metrics: None,
            dashboard: Some(dashboard_listener),
        };
        app::run_all(&settings, serving, listeners, token)
            .await
            .unwrap()
    });
    Running {
        dashboard,
        coordinator,
        shutdown,
        dir,
    }
}

/// A sweep of two rho values and two seeds on a tiny budget, every trial completed with a
/// per-epoch curve. Returns the sweep and its trials' count.
async fn finished_sweep(coordinator: &Coordinator) -> (SweepId, u32) {
    finished_sweep_with(coordinator, "").await
}

/// [`finished_sweep`] with `extra` appended to its sweep file (downstream tasks); every trial
/// the coordinator leases is completed, downstream trials included.
async fn finished_sweep_with(coordinator: &Coordinator, extra: &str) -> (SweepId, u32) {
    let toml = format!(
        "name = {name:?}\ndataset = \"idx:data/mnist-subset\"\nseeds = [0, 1]\n\
         [grid]\nblock = [\"basic\"]\nrho = [0.3, 1.0]\nbudget = [{{ params = \"20K\", flops = \"4M\" }}]\n\
         resolution = 28\nnum_classes = 10\nin_channels = 1\n[recipe]\nepochs = {EPOCHS}\nwarmup_epochs = 0\n{extra}",
        name = SWEEP_NAME
    );
    let spec = SweepSpec::from_toml(&toml).unwrap();
    let (sweep, created, _) = coordinator.create_sweep(spec, "test").await.unwrap();
    assert!(created.new_trials >= 2, "{created:?}");
    let worker = WorkerId(uuid::Uuid::new_v4());
    coordinator
        .register(NewWorker {
            id: worker,
            name: "fake".into(),
            devices_json: "[]".into(),
            protocol_version: deepmad_coordinator::service::PROTOCOL_VERSION,
        })
        .await
        .unwrap();
    let mut done = 0;
    while let Some(lease) = coordinator.lease(worker).await.unwrap() {
        let top1 = 0.80 + 0.03 * f64::from(done);
        let epochs = (1..=EPOCHS)
            .map(|epoch| EpochMetrics {
                epoch,
                train_loss: 1.0 / f64::from(epoch),
                test_loss: 1.2 / f64::from(epoch),
                top1: top1 - 0.1 * f64::from(EPOCHS - epoch),
                top5: 0.99,
                images_per_second: 100.0,
                learning_rate: 0.1,
            })
            .collect();
        let metrics = FinalMetrics {
            top1,
            top5: 0.99,
            test_loss: 0.4,
            train_seconds: 12.0,
            epochs: EPOCHS,
            dataset_hash: "abc".into(),
            checkpoint: None,
            epochs_metrics: epochs,
        };
        coordinator
            .complete(lease.attempt, lease.token, &metrics)
            .await
            .unwrap();
        done += 1;
    }
    assert!(done >= created.new_trials, "{done} of {created:?}");
    (sweep, done)
}

/// One HTTP response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) and reads the whole response.
async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> Reply {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = form {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a complete response head");
    let head = std::str::from_utf8(&raw[..split]).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(name, value)| {
        name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body: String::from_utf8(body).expect("a UTF-8 body"),
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

async fn get(address: SocketAddr, path: &str) -> Reply {
    http(address, "GET", path, &[], None).await
}

async fn get_with(address: SocketAddr, path: &str, header: (&str, &str)) -> Reply {
    http(address, "GET", path, &[header], None).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_the_api_show_a_sweep() {
    let running = start(false).await;
    let (sweep, trials) = finished_sweep(&running.coordinator).await;
    let address = running.dashboard;

    let list = get(address, "/").await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(list.body.contains(SWEEP_NAME_ESCAPED), "{}", list.body);
    assert!(!list.body.contains("<b>sweep</b>"), "the name is escaped");
    assert!(list.body.contains(&format!("data-progress=\"{sweep}\"")));

    let api = get(address, "/api/sweeps").await;
    assert_eq!(api.status, 200);
    assert!(api
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    let sweeps = api.json();
    assert_eq!(sweeps["sweeps"][0]["id"], sweep.to_string());
    assert_eq!(sweeps["sweeps"][0]["name"], SWEEP_NAME);

    let summary = get(address, &format!("/api/sweeps/{sweep}")).await.json();
    assert_eq!(summary["counts"]["succeeded"], trials);
    assert_eq!(summary["state"], "completed");

    let board = get(address, &format!("/api/sweeps/{sweep}/leaderboard"))
        .await
        .json();
    let rows = board["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    let seeds: u64 = rows.iter().map(|row| row["seeds"].as_u64().unwrap()).sum();
    assert_eq!(
        seeds,
        u64::from(trials),
        "every trial counts once: {board:#}"
    );
    let design = rows[0]["design_id"].as_str().unwrap().to_string();
    let tops: Vec<f64> = rows
        .iter()
        .map(|row| row["top1_mean"].as_f64().unwrap())
        .collect();
    assert!(
        tops.windows(2).all(|pair| pair[0] >= pair[1]),
        "best first: {tops:?}"
    );

    let analytics = get(address, &format!("/api/sweeps/{sweep}/analytics"))
        .await
        .json();
    assert_eq!(analytics["trials"], trials);
    assert_eq!(analytics["designs"].as_array().unwrap().len(), rows.len());

    let page = get(address, &format!("/sweeps/{sweep}")).await;
    assert_eq!(page.status, 200);
    let policy = page.header("content-security-policy").expect("a CSP");
    assert!(policy.contains("script-src 'sha256-"), "{policy}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(page
        .body
        .contains(&format!("<h1>{SWEEP_NAME_ESCAPED}</h1>")));
    assert_eq!(
        page.body.matches("<tr data-family=\"basic\">").count(),
        rows.len()
    );
    for chart in ["rho", "pareto", "entropy", "curves"] {
        assert!(
            page.body
                .contains(&format!("<figure data-chart=\"{chart}\"><svg")),
            "{chart}"
        );
    }
    assert!(page.body.contains("top-1 %") && page.body.contains("effectiveness bound rho"));

    let fragment = get(address, &format!("/fragments/sweeps/{sweep}/leaderboard")).await;
    assert_eq!(fragment.status, 200);
    assert!(fragment.body.starts_with("<table class=\"leaderboard\">"));
    let charts = get(address, &format!("/fragments/sweeps/{sweep}/charts")).await;
    assert_eq!(charts.body.matches("<svg").count(), 4);

    let svg = get(address, &format!("/sweeps/{sweep}/charts/pareto.svg")).await;
    assert_eq!(svg.status, 200);
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    assert!(svg.body.starts_with("<svg") && svg.body.contains("Pareto front"));

    let design_page = get(address, &format!("/sweeps/{sweep}/designs/{design}")).await;
    assert_eq!(design_page.status, 200, "{}", design_page.body);
    let body = &design_page.body;
    for section in [
        "Stages",
        "Analysis",
        "Results in this sweep",
        "Training curves",
    ] {
        assert!(body.contains(&format!("<h2>{section}</h2>")), "{section}");
    }
    assert!(body.contains("<table class=\"stages\">") && body.contains("<table class=\"scales\">"));
    assert!(body.contains("<figure class=\"single\" data-chart=\"curves\"><svg"));
    assert!(body.contains(SWEEP_NAME_ESCAPED));
    assert!(body.contains("No downstream evaluations"));

    let trial = rows_trial(&running, sweep).await;
    let history = get(address, &format!("/api/trials/{trial}")).await.json();
    assert_eq!(history["epochs"].as_array().unwrap().len(), EPOCHS as usize);
    assert_eq!(history["state"], "succeeded");
}

/// One trial of the sweep (through the use case, as the page links them).
async fn rows_trial(running: &Running, sweep: SweepId) -> String {
    let results = running.coordinator.export_results(sweep).await.unwrap();
    results[0].trial.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_unknown_routes_are_404s_that_say_why() {
    let running = start(false).await;
    let (sweep, _) = finished_sweep(&running.coordinator).await;
    let address = running.dashboard;
    let unknown = uuid::Uuid::new_v4();

    let reply = get(address, "/api/sweeps/not-a-uuid").await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.json()["error"].as_str().unwrap().contains("UUID"),
        "{}",
        reply.body
    );
    let reply = get(address, &format!("/api/sweeps/{unknown}")).await;
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains(&unknown.to_string()));
    let reply = get(address, &format!("/api/sweeps/{unknown}/leaderboard")).await;
    assert_eq!(
        reply.status, 404,
        "an unknown sweep is no empty leaderboard"
    );
    let reply = get(address, &format!("/api/trials/{unknown}")).await;
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"].as_str().unwrap().contains("trial"));
    assert_eq!(
        get(address, "/api/nothing").await.json()["error"],
        "no page at /api/nothing"
    );

    let page = get(address, "/sweeps/%3Cscript%3E").await;
    assert_eq!(page.status, 404);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(
        page.body.contains("no sweep &quot;&lt;script&gt;&quot;"),
        "{}",
        page.body
    );
    let page = get(address, &format!("/sweeps/{sweep}/designs/xyz")).await;
    assert_eq!(page.status, 404);
    assert!(
        page.body.contains("64 lowercase hex digits"),
        "{}",
        page.body
    );
    let page = get(
        address,
        &format!("/sweeps/{sweep}/designs/{}", "0".repeat(64)),
    )
    .await;
    assert_eq!(page.status, 404);
    assert!(page.body.contains("design"), "{}", page.body);
    let page = get(address, &format!("/sweeps/{sweep}/charts/pie.svg")).await;
    assert_eq!(page.status, 404);
    assert!(page.body.contains("rho.svg"), "{}", page.body);
    assert_eq!(get(address, "/nothing/here").await.status, 404);
    // Without tokens the login form is not needed.
    let login = get(address, "/login?next=/api/sweeps").await;
    assert_eq!(
        (login.status, login.header("location")),
        (303, Some("/api/sweeps"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_client_tokens_open_the_dashboard() {
    let running = start(true).await;
    let (sweep, _) = finished_sweep(&running.coordinator).await;
    let address = running.dashboard;

    // The API: 401 without a token, with a worker token or an unknown one; 200 with a client's.
    let reply = get(address, "/api/sweeps").await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"deepmad\"")
    );
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("missing credentials"));
    let reply = get_with(
        address,
        "/api/sweeps",
        ("Authorization", &bearer(WORKER_TOKEN)),
    )
    .await;
    assert_eq!(reply.status, 401);
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("worker token"));
    let reply = get_with(
        address,
        "/api/sweeps",
        ("Authorization", "Bearer not-a-real-token-1234"),
    )
    .await;
    assert_eq!(reply.status, 401);
    let reply = get_with(
        address,
        "/api/sweeps",
        ("Authorization", &bearer(CLIENT_TOKEN)),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["sweeps"][0]["id"], sweep.to_string());
    let fragment = get(address, &format!("/fragments/sweeps/{sweep}/leaderboard")).await;
    assert_eq!(
        fragment.status, 401,
        "the script's fragments are not redirected"
    );

    // Pages: to the login form, with the way back.
    let page = get(address, &format!("/sweeps/{sweep}?x=1")).await;
    assert_eq!(page.status, 303);
    assert_eq!(
        page.header("location"),
        Some(format!("/login?next=/sweeps/{sweep}%3Fx%3D1").as_str())
    );
    let form = get(address, "/login").await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("name=\"token\""));

    // A ?token= link: the cookie, and a redirect that drops the token.
    let link = get(
        address,
        &format!("/sweeps/{sweep}?x=1&token={CLIENT_TOKEN}"),
    )
    .await;
    assert_eq!(link.status, 303);
    assert_eq!(
        link.header("location"),
        Some(format!("/sweeps/{sweep}?x=1").as_str())
    );
    let cookie = link
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains(CLIENT_TOKEN),
        "the cookie is not the token"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let page = get_with(address, &format!("/sweeps/{sweep}"), ("Cookie", &session)).await;
    assert_eq!(page.status, 200);
    assert!(
        !page.body.contains(CLIENT_TOKEN),
        "the token never reaches a page"
    );
    assert!(page.body.contains("action=\"/logout\""));
    let api = get_with(
        address,
        &format!("/api/sweeps/{sweep}"),
        ("Cookie", &session),
    )
    .await;
    assert_eq!(api.status, 200);
    let refused = get(address, &format!("/?token={WORKER_TOKEN}")).await;
    assert_eq!(refused.status, 401);
    assert!(refused.header("set-cookie").is_none());
    assert!(refused
        .body
        .contains("worker token cannot open the dashboard"));
    assert!(!refused.body.contains(WORKER_TOKEN));

    // The login form.
    let next = format!("/sweeps/{sweep}");
    let posted = http(
        address,
        "POST",
        "/login",
        &[],
        Some(&format!("token={CLIENT_TOKEN}&next={next}")),
    )
    .await;
    assert_eq!(posted.status, 303);
    assert_eq!(posted.header("location"), Some(next.as_str()));
    assert!(posted
        .header("set-cookie")
        .unwrap()
        .starts_with("deepmad_session="));
    let posted = http(
        address,
        "POST",
        "/login",
        &[],
        Some(&format!("token={WORKER_TOKEN}")),
    )
    .await;
    assert_eq!(posted.status, 401);
    assert!(posted.header("set-cookie").is_none());
    let posted = http(
        address,
        "POST",
        "/login",
        &[],
        Some(&format!("token={CLIENT_TOKEN}&next=//evil.example")),
    )
    .await;
    assert_eq!(
        posted.header("location"),
        Some("/"),
        "no redirects off the server"
    );
    let out = http(
        address,
        "POST",
        "/logout",
        &[("Cookie", &session)],
        Some(""),
    )
    .await;
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
}

/// Chromium's path, or `None` (after saying so loudly) when it is not installed outside CI.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("DEEPMAD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        return Some(path);
    }
    let message = format!(
        "headless Chromium not found at {}: install Debian's package (apt-get install -y \
         chromium) or set DEEPMAD_CHROMIUM",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{message}");
    }
    eprintln!("\n!!!!!!!!\n!!! SKIPPING the dashboard's browser test: {message}\n!!!!!!!!\n");
    None
}

/// Runs headless Chromium with `arguments` then `url`, stdout to `out`; kills it after
/// [`BROWSER_TIMEOUT`].
fn run_chromium(chromium: &Path, profile: &Path, arguments: &[String], url: &str, out: &Path) {
    let stderr_path = out.with_extension("stderr");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(arguments)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", chromium.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ran past {BROWSER_TIMEOUT:?}; its stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium failed ({status}); its stderr:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
}

/// Runs Chromium on a blocking thread, so the runtime keeps serving the pages meanwhile.
async fn browse(chromium: &Path, profile: &Path, arguments: Vec<String>, url: String, out: &Path) {
    let (chromium, profile, out) = (chromium.to_owned(), profile.to_owned(), out.to_owned());
    tokio::task::spawn_blocking(move || run_chromium(&chromium, &profile, &arguments, &url, &out))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_renders_the_leaderboard_and_the_charts() {
    let Some(chromium) = chromium() else {
        return;
    };
    let running = start(true).await;
    let (sweep, _) = finished_sweep(&running.coordinator).await;
    let designs = running
        .coordinator
        .leaderboard(&deepmad_coordinator::store::LeaderboardFilter {
            sweep: Some(sweep),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    let url = format!(
        "http://{}/sweeps/{sweep}?token={CLIENT_TOKEN}",
        running.dashboard
    );
    let work = running.dir.path();

    let dom_path = work.join("dom.html");
    browse(
        &chromium,
        &work.join("profile-dom"),
        vec!["--dump-dom".into()],
        url.clone(),
        &dom_path,
    )
    .await;
    let dom = std::fs::read_to_string(&dom_path).unwrap();
    assert!(
        dom.contains(&format!("data-sweep-page=\"{sweep}\"")),
        "not the sweep's page:\n{dom}"
    );
    assert!(
        !dom.contains(CLIENT_TOKEN),
        "the token stays out of the page"
    );
    // The script ran: it fetched the leaderboard fragment with the session cookie, filled the
    // family filter from the rows, and updated the progress from the JSON API.
    assert!(
        dom.contains("data-refreshed=\"1\""),
        "the script did not refresh the table:\n{dom}"
    );
    assert!(
        dom.contains("<option value=\"basic\">basic</option>"),
        "{dom}"
    );
    assert!(
        dom.contains("data-updated=\""),
        "the progress was not polled:\n{dom}"
    );
    assert!(
        dom.contains("data-field=\"error\" hidden=\"\""),
        "the script reported an error:\n{dom}"
    );
    assert_eq!(
        dom.matches("<tr data-family=\"basic\"").count(),
        designs,
        "{dom}"
    );
    assert!(dom.contains(&format!("<span data-field=\"rows\">{designs}</span>")));
    assert!(dom.contains("<figure data-chart=\"rho\"><svg"), "{dom}");
    assert!(
        dom.contains("effectiveness bound rho") && dom.contains("top-1 %"),
        "axis labels"
    );

    let png_path = work.join("sweep.png");
    let arguments = vec![
        format!("--screenshot={}", png_path.display()),
        "--window-size=1280,900".to_string(),
        "--hide-scrollbars".to_string(),
    ];
    browse(
        &chromium,
        &work.join("profile-shot"),
        arguments,
        url,
        &work.join("shot.out"),
    )
    .await;
    let png = std::fs::read(&png_path).expect("chromium wrote the screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 900));
    assert!(
        png.len() > 20_000,
        "a page, not a blank: {} bytes",
        png.len()
    );
    if let Some(dir) = std::env::var_os("DEEPMAD_SCREENSHOT_DIR") {
        std::fs::copy(&png_path, Path::new(&dir).join("dashboard-sweep.png")).unwrap();
    }
}

#[tokio::test]
async fn downstream_results_are_columns_agreement_and_design_sections() {
    let running = start(false).await;
    let extra = "[[downstream]]\nname = \"probe\"\ntask = \"linear-probe\"\n\
                 dataset = \"idx:data/other\"\n";
    let (sweep, trials) = finished_sweep_with(&running.coordinator, extra).await;
    let address = running.dashboard;
    let summary = get(address, &format!("/api/sweeps/{sweep}")).await.json();
    let succeeded = summary["counts"]["succeeded"].as_u64().unwrap();
    assert_eq!(succeeded, u64::from(trials));
    assert_eq!(succeeded % 2, 0, "a probe per training trial: {summary:#}");

    let board = get(address, &format!("/api/sweeps/{sweep}/leaderboard"))
        .await
        .json();
    let rows = board["rows"].as_array().expect("rows");
    for row in rows {
        let tasks = row["downstream"].as_array().expect("downstream columns");
        assert_eq!(tasks.len(), 1, "{row:#}");
        assert_eq!(tasks[0]["name"], "probe");
        assert_eq!(tasks[0]["seeds"], row["seeds"], "{row:#}");
    }
    let page = get(address, &format!("/sweeps/{sweep}")).await;
    assert!(page.body.contains("probe"), "a column for the task");
    assert!(
        page.body.contains("<table class=\"agreement\">"),
        "the rank agreement table"
    );
    let design = rows[0]["design_id"].as_str().unwrap();
    let design_page = get(address, &format!("/sweeps/{sweep}/designs/{design}")).await;
    assert_eq!(design_page.status, 200, "{}", design_page.body);
    assert!(!design_page.body.contains("No downstream evaluations"));
    assert!(design_page.body.contains("idx:data/other"));
}
