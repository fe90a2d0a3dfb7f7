//! Bad and hostile requests against a coordinator process with tokens and a 64 KiB message
//! limit: each is refused with a clear status, nothing is stored, and the server stays up.

use std::time::Duration;

use bytes::Bytes;
use deepmad_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use super::checks;
use super::harness::{Cluster, PATIENCE};
use super::postgres::{shared_admin_url, TestDatabase};

const WORKER_TOKEN: &str = "e2e-worker-token-0123456789";
const CLIENT_TOKEN: &str = "e2e-client-token-0123456789";
const UNKNOWN_TOKEN: &str = "e2e-unknown-token-0123456789";

// This test trains nothing, so it runs beside the others rather than in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_hostile_requests_are_refused_and_the_coordinator_stays_up() {
    let database = TestDatabase::create(&shared_admin_url()).await;
    let mut cluster = Cluster::new(
        &database.url,
        &[
            ("DEEPMAD__AUTH__WORKER_TOKENS", WORKER_TOKEN),
            ("DEEPMAD__AUTH__CLIENT_TOKENS", CLIENT_TOKEN),
            ("DEEPMAD__LIMITS__MAX_MESSAGE_BYTES", "65536"),
        ],
    );
    cluster.client_token = Some(CLIENT_TOKEN.to_string());
    cluster.worker_token = Some(WORKER_TOKEN.to_string());
    cluster.start_coordinator().await;

    wrong_and_missing_tokens_are_refused(&mut cluster).await;
    malformed_messages_get_a_clear_status(&cluster).await;
    oversized_messages_are_refused(&cluster).await;
    absurd_sweeps_are_refused_naming_the_grid(&cluster).await;

    // Nothing was stored, and the coordinator still answers.
    assert!(
        cluster.coordinator().exited().is_none(),
        "the coordinator died"
    );
    assert!(cluster.api().list_sweeps().await.unwrap().is_empty());
    let pool = &cluster.sql().await;
    for table in ["sweeps", "designs", "trials", "workers", "attempts"] {
        assert_eq!(checks::count(pool, table).await, 0, "rows in {table}");
    }
    let listed = cluster.cli_ok(&["sweep", "list"]);
    assert!(listed.starts_with("sweep"), "{listed}");
}

async fn wrong_and_missing_tokens_are_refused(cluster: &mut Cluster) {
    let api = cluster.api();
    for (token, needle) in [
        (None, "missing authorization header"),
        (Some(UNKNOWN_TOKEN), "unknown token"),
    ] {
        let output = cluster.cli_with_token(&["sweep", "list"], token);
        assert_eq!(output.code, Some(2), "{token:?}: {output:?}");
        assert!(output.stderr.contains(needle), "{token:?}: {output:?}");
        let status = api.with_token(token).list_sweeps().await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let work = api.with_token(token);
        let status = work
            .work()
            .register(work.request(register_request()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    // Each role's token opens only its own door.
    let output = cluster.cli_with_token(&["sweep", "list"], Some(WORKER_TOKEN));
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(output.stderr.contains("worker token"), "{output:?}");
    let status = api
        .work()
        .register(api.request(register_request()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A worker process without a valid worker token gives up at registration.
    for (index, token) in [None, Some(UNKNOWN_TOKEN), Some(CLIENT_TOKEN)]
        .into_iter()
        .enumerate()
    {
        let worker = cluster.start_worker_with_token(&format!("intruder-{index}"), token);
        let worker = &mut cluster.workers[worker];
        let status = worker.wait_exit(PATIENCE).await;
        assert_eq!(status.code(), Some(1), "{token:?}: {}", worker.log_text());
        assert!(
            worker.log_text().contains("registration refused"),
            "{token:?}: {}",
            worker.log_text()
        );
    }
    cluster.cli_ok(&["sweep", "list"]);
}

fn register_request() -> v1::RegisterRequest {
    v1::RegisterRequest {
        protocol_version: deepmad_proto::PROTOCOL_VERSION,
        worker_id: "00000000-0000-4000-8000-000000000001".into(),
        name: "intruder".into(),
        devices: vec![],
    }
}

async fn malformed_messages_get_a_clear_status(cluster: &Cluster) {
    let api = cluster.api();
    let create = "/deepmad.v1.SweepService/CreateSweep";
    let cases: [(&str, &[u8]); 6] = [
        ("a varint of eleven 0xff bytes", &[0xff; 11]),
        ("a field longer than the message", &[0x0a, 0x7f]),
        (
            "a nested field longer than its parent",
            &[0x0a, 0x03, 0x12, 0x05, 0x01],
        ),
        (
            "a name that is not UTF-8",
            &[0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe],
        ),
        ("a truncated varint", &[0x38, 0x80]),
        ("wire type 7", &[0x0f]),
    ];
    for (what, body) in cases {
        let status = api
            .raw_call(create, Bytes::from_static(body))
            .await
            .unwrap_err();
        // gRPC's status-code guide asks INTERNAL for a message that does not parse; tonic
        // follows it. Either code is a clear refusal; the message must say what failed.
        assert!(
            matches!(status.code(), Code::Internal | Code::InvalidArgument),
            "{what}: {status:?}"
        );
        assert!(status.message().contains("decode"), "{what}: {status:?}");
    }
    let worker = api.with_token(Some(WORKER_TOKEN));
    let status = worker
        .raw_call(
            "/deepmad.v1.WorkService/Complete",
            Bytes::from_static(&[0x1a, 0x7f, 0x09]),
        )
        .await
        .unwrap_err();
    assert!(status.message().contains("decode"), "{status:?}");
    let status = api
        .raw_call("/deepmad.v1.SweepService/DropEverything", Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // Bytes that are not HTTP/2 at all, straight onto the socket: the connection is closed.
    let mut socket = tokio::net::TcpStream::connect(cluster.address)
        .await
        .expect("connecting");
    let mut garbage = b"GET / HTTP/1.1\r\nHost: deepmad\r\n\r\n".to_vec();
    garbage.extend((0..4096u32).map(|i| (i * 31 % 251) as u8));
    let _ = socket.write_all(&garbage).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server kept a garbage connection open");
    assert!(api.list_sweeps().await.is_ok(), "the server still answers");
}

/// A sweep spec that would be fine, but for what a test does to it.
fn spec() -> v1::SweepSpec {
    v1::SweepSpec {
        name: "hostile".into(),
        grid: Some(v1::Grid {
            families: vec![v1::Family::Basic as i32],
            rho: vec![0.5],
            alpha: vec![],
            budgets: vec![v1::Budget {
                params: Some(10_000),
                flops: None,
            }],
            resolution: Some(8),
            num_classes: Some(4),
            objective: v1::ObjectiveKind::Paper as i32,
            beta: None,
            max_layers: None,
            stage_strides: vec![],
            in_channels: Some(1),
        }),
        recipe_json: r#"{"epochs": 1, "warmup_epochs": 0}"#.into(),
        dataset: "idx:data".into(),
        seeds: vec![0],
        downstream: vec![],
        max_attempts: 0,
    }
}

async fn oversized_messages_are_refused(cluster: &Cluster) {
    let api = cluster.api();
    // 20,000 rho values: 160 KB, over the 64 KiB limit.
    let mut huge = spec();
    huge.grid.as_mut().expect("a grid").rho = vec![0.5; 20_000];
    let request = api.request(v1::CreateSweepRequest { spec: Some(huge) });
    let status = api.sweeps().create_sweep(request).await.unwrap_err();
    // tonic refuses a message over the limit with OUT_OF_RANGE ("message length too large"),
    // read from the length prefix before the body is buffered.
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");
    // A megabyte of zeros on the work service, with a worker's token.
    let worker = api.with_token(Some(WORKER_TOKEN));
    let status = worker
        .raw_call(
            "/deepmad.v1.WorkService/Heartbeat",
            Bytes::from(vec![0u8; 1 << 20]),
        )
        .await
        .unwrap_err();
    assert!(status.message().contains("too large"), "{status:?}");
    assert!(api.list_sweeps().await.is_ok(), "the server still answers");
}

async fn absurd_sweeps_are_refused_naming_the_grid(cluster: &Cluster) {
    let api = cluster.api();
    // 4 families x 1,000 rho x 1,000 budgets: four million grid points in 16 KB.
    let mut absurd = spec();
    let grid = absurd.grid.as_mut().expect("a grid");
    grid.families = vec![
        v1::Family::Basic as i32,
        v1::Family::Bottleneck as i32,
        v1::Family::Mbconv as i32,
        v1::Family::MbconvSe as i32,
    ];
    grid.rho = (1..=1000).map(|i| f64::from(i) / 1000.0).collect();
    grid.budgets = (1..=1000)
        .map(|i| v1::Budget {
            params: Some(10_000 + i),
            flops: None,
        })
        .collect();
    let request = api.request(v1::CreateSweepRequest { spec: Some(absurd) });
    let status = api.sweeps().create_sweep(request).await.unwrap_err();
    // The coordinator treats the grid-size limit as RESOURCE_EXHAUSTED
    // (coordinator/src/sweep.rs); INVALID_ARGUMENT would do as well.
    assert!(
        matches!(
            status.code(),
            Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    assert!(
        status.message().contains("grid") && status.message().contains("4000000"),
        "{status:?}"
    );

    // The same through the CLI, from a sweep file.
    let rho: Vec<String> = (1..=2000)
        .map(|i| format!("{}", f64::from(i) / 2000.0))
        .collect();
    let budgets: Vec<String> = (1..=2000)
        .map(|i| format!("{{ params = {} }}", 10_000 + i))
        .collect();
    let toml = format!(
        "name = \"absurd\"\ndataset = \"idx:data\"\nseeds = [0]\n[grid]\nblock = [\"basic\"]\n\
         rho = [{}]\nbudget = [{}]\nresolution = 8\nnum_classes = 4\nin_channels = 1\n\
         [recipe]\nepochs = 1\nwarmup_epochs = 0\n",
        rho.join(", "),
        budgets.join(", ")
    );
    let file = cluster.path("absurd.toml");
    std::fs::write(&file, toml).expect("writing the sweep file");
    let output = cluster.cli(&["sweep", "create", file.to_str().expect("UTF-8 path")]);
    assert_eq!(output.code, Some(2), "{output:?}");
    assert!(output.stderr.contains("4000000"), "{output:?}");
}
