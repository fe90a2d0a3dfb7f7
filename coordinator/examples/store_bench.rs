//! Benchmarks the PostgreSQL store: lease+complete cycles per second with 200 simulated
//! workers, claim latency, and leaderboard latency over 1,000,000 results.
//!
//! ```text
//! cargo run --release -p deepmad-coordinator --example store_bench
//! ```
//!
//! Environment: `DEEPMAD_BENCH_DATABASE_URL` (default: a fresh database
//! `deepmad_bench_<uuid>` on `postgres://postgres@127.0.0.1:5432`, dropped at the end),
//! `DEEPMAD_BENCH_POOL` (connections, default 16), `DEEPMAD_BENCH_SECONDS` (per load phase,
//! default 10), `DEEPMAD_BENCH_RATE` (cycles/s the paced phase offers, default 2000),
//! `DEEPMAD_BENCH_RESULTS` (bulk results for the leaderboard, default 1000000).
//!
//! Phases: (1) saturated: 200 workers claim and complete back to back, as fast as the
//! database allows (capacity); (2) paced: the same workers each start a cycle every
//! 200 / rate seconds (100 ms at 2,000 cycles/s), staggered, so the store is offered the target
//! rate and the claim latency is what a cluster at that rate sees; (3) leaderboard: 1,000,000
//! results bulk-inserted with `generate_series`, then each leaderboard query timed 30 times.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use deepmad_coordinator::model::{DesignId, SweepId, WorkerId};
use deepmad_coordinator::store::{
    CompleteOutcome, FinalMetrics, LeaderboardFilter, NewDesign, NewGridPoint, NewSweep, NewWorker,
    PoolSettings, Store,
};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const WORKERS: usize = 200;
const LEASE_MS: i64 = 60_000;
const BULK_SEEDS: i64 = 5;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = BenchSettings::from_env()?;
    let (url, scratch) = database_url(&settings).await?;
    let outcome = run(&settings, &url).await;
    if let Some(name) = scratch {
        drop_database(&name).await?;
    }
    let report = outcome?;
    report.print(&settings);
    Ok(())
}

struct BenchSettings {
    url: Option<String>,
    pool: u32,
    phase: Duration,
    rate: u64,
    results: i64,
}

impl BenchSettings {
    fn from_env() -> anyhow::Result<BenchSettings> {
        let number = |key: &str, default: u64| -> anyhow::Result<u64> {
            match std::env::var(key) {
                Ok(text) => text
                    .parse()
                    .with_context(|| format!("{key} is not a number")),
                Err(_) => Ok(default),
            }
        };
        Ok(BenchSettings {
            url: std::env::var("DEEPMAD_BENCH_DATABASE_URL").ok(),
            pool: number("DEEPMAD_BENCH_POOL", 16)? as u32,
            phase: Duration::from_secs(number("DEEPMAD_BENCH_SECONDS", 10)?),
            rate: number("DEEPMAD_BENCH_RATE", 2_000)?.max(1),
            results: number("DEEPMAD_BENCH_RESULTS", 1_000_000)? as i64,
        })
    }
}

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// Returns the database to use, and the name of a scratch database to drop afterwards.
async fn database_url(settings: &BenchSettings) -> anyhow::Result<(String, Option<String>)> {
    if let Some(url) = &settings.url {
        return Ok((url.clone(), None));
    }
    let name = format!("deepmad_bench_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&format!("{SERVER}/postgres")).await?;
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    Ok((format!("{SERVER}/{name}"), Some(name)))
}

async fn drop_database(name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(&format!("{SERVER}/postgres")).await?;
    sqlx::raw_sql(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

struct Report {
    saturated: LoadOutcome,
    paced: LoadOutcome,
    sweep_create: Duration,
    bulk_load: Duration,
    leaderboards: Vec<(String, Timings)>,
    plain_group_by: Timings,
    results: i64,
}

async fn run(settings: &BenchSettings, url: &str) -> anyhow::Result<Report> {
    let pool = PoolSettings {
        max_connections: settings.pool,
        acquire_timeout: Duration::from_secs(60),
    };
    let store = Store::connect_with(url, &pool).await?;
    // Enough trials for both load phases: the saturated one at up to 10,000 cycles/s, the
    // paced one at its rate. A worker that finds the queue empty fails the run.
    let trials_needed =
        (10_000 + settings.rate as usize) * settings.phase.as_secs().max(1) as usize;
    let started = Instant::now();
    store
        .create_sweep(&load_sweep(trials_needed), Utc::now())
        .await?;
    let sweep_create = started.elapsed();
    let saturated = load(&store, settings.phase, None).await?;
    let period = Duration::from_secs_f64(WORKERS as f64 / settings.rate as f64);
    let paced = load(&store, settings.phase, Some(period)).await?;
    store.close().await;

    let mut conn = PgConnection::connect(url).await?;
    let started = Instant::now();
    let medium_sweep = bulk_load(&mut conn, settings.results).await?;
    let bulk_load = started.elapsed();
    let store = Store::connect_with(url, &pool).await?;
    let leaderboards = time_leaderboards(&store, medium_sweep).await?;
    let plain_group_by = time_plain_group_by(&mut conn).await?;
    store.close().await;
    Ok(Report {
        saturated,
        paced,
        sweep_create,
        bulk_load,
        leaderboards,
        plain_group_by,
        results: settings.results,
    })
}

/// A sweep of `trials` trials: designs times 5 seeds.
fn load_sweep(trials: usize) -> NewSweep {
    let designs: Vec<NewDesign> = (0..trials.div_ceil(5)).map(load_design).collect();
    let grid = designs
        .iter()
        .enumerate()
        .map(|(index, design)| NewGridPoint {
            index: index as i32,
            family: design.family.clone(),
            objective_kind: "paper".to_string(),
            rho: 0.3,
            alpha_json: "[1,1,1,8]".to_string(),
            beta: 10.0,
            params_budget: Some(5_000_000),
            flops_budget: None,
            resolution: 32,
            design_id: Some(design.id.clone()),
            infeasible_reason: None,
            solve_ms: 1.0,
        })
        .collect();
    NewSweep {
        id: SweepId::new(),
        name: "load".to_string(),
        created_by: "store_bench".to_string(),
        spec_json: "{}".to_string(),
        dataset: "idx:load".to_string(),
        recipe_json: r#"{"epochs":1}"#.to_string(),
        recipe_hash: "load-recipe".to_string(),
        seeds: (1..=5).collect(),
        max_attempts: 3,
        grid,
        tasks: Vec::new(),
        designs,
    }
}

fn load_design(index: usize) -> NewDesign {
    NewDesign {
        id: DesignId(format!("load-{index:010}")),
        family: "basic".to_string(),
        objective_kind: "paper".to_string(),
        architecture_json: format!(r#"{{"load":{index}}}"#),
        params: 1_000_000 + index as i64,
        flops: 100_000_000,
        layers: 18,
        effectiveness: 0.5,
        entropy: 10.0,
        penalty: 0.0,
        objective: 10.0,
        resolution: 32,
        num_classes: 10,
        solver_version: "bench".to_string(),
    }
}

struct LoadOutcome {
    cycles: usize,
    elapsed: Duration,
    claim_latency: Timings,
    cycle_latency: Timings,
}

/// Runs 200 workers for `phase`, each claiming and completing: back to back, or starting a
/// cycle every `period` (a late cycle starts at once, and the schedule shifts).
async fn load(
    store: &Store,
    phase: Duration,
    period: Option<Duration>,
) -> anyhow::Result<LoadOutcome> {
    let deadline = Instant::now() + phase;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(WORKERS);
    for index in 0..WORKERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            worker_loop(&store, index, deadline, period).await
        }));
    }
    let mut claims = Vec::new();
    let mut cycles = Vec::new();
    for task in tasks {
        let (claim_times, cycle_times) = task.await??;
        claims.extend(claim_times);
        cycles.extend(cycle_times);
    }
    Ok(LoadOutcome {
        cycles: cycles.len(),
        elapsed: started.elapsed(),
        claim_latency: Timings::new(claims),
        cycle_latency: Timings::new(cycles),
    })
}

async fn worker_loop(
    store: &Store,
    index: usize,
    deadline: Instant,
    period: Option<Duration>,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let worker = NewWorker {
        id: WorkerId::new(),
        name: format!("bench-{index}"),
        devices_json: "[]".to_string(),
        protocol_version: 1,
    };
    store.register_worker(&worker, Utc::now()).await?;
    // Stagger the paced workers so they do not arrive in lockstep.
    let mut ticks = period.map(|period| {
        let first = tokio::time::Instant::now() + period.mul_f64(index as f64 / WORKERS as f64);
        let mut ticks = tokio::time::interval_at(first, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    let (mut claims, mut cycles) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let started = Instant::now();
        let Some(lease) = store.claim(worker.id, LEASE_MS, Utc::now()).await? else {
            anyhow::bail!("the load sweep ran out of trials: the numbers would be short");
        };
        claims.push(started.elapsed());
        let outcome = store
            .complete(lease.attempt, lease.token, &bench_metrics(), Utc::now())
            .await?;
        anyhow::ensure!(
            outcome == CompleteOutcome::Recorded,
            "completion was {outcome:?}"
        );
        cycles.push(started.elapsed());
    }
    Ok((claims, cycles))
}

fn bench_metrics() -> FinalMetrics {
    FinalMetrics {
        top1: 0.9,
        top5: 0.99,
        test_loss: 0.3,
        train_seconds: 1.0,
        epochs: 1,
        dataset_hash: "bench".to_string(),
        checkpoint: None,
        epochs_metrics: Vec::new(),
    }
}

/// Bulk-loads `results` succeeded trials (designs times 5 seeds) with their attempts,
/// results and aggregates, all in SQL. Returns a 10,000-result sweep over a slice of them.
async fn bulk_load(conn: &mut PgConnection, results: i64) -> anyhow::Result<SweepId> {
    let designs = (results / BULK_SEEDS).max(1);
    let medium_designs = designs.min(2_000);
    let (big, medium, worker) = (SweepId::new(), SweepId::new(), WorkerId::new());
    let design = "'bulk-' || lpad(i::text, 10, '0')";
    let sql = format!(
        "INSERT INTO designs SELECT {design}, \
             (ARRAY['basic','bottleneck','mbconv','mbconv-se'])[1 + i % 4], 'paper', \
             ('{{\"bulk\":' || i || '}}')::json, 100000 + (i * 7919) % 5000000, \
             (i * 104729) % 1000000000, 10 + i % 40, random(), 10 * random(), 0, \
             10 * random(), 224, 1000, 'bench', now() \
         FROM generate_series(1::bigint, {designs}) AS i"
    );
    timed(conn, "designs", sqlx::query(&sql)).await?;
    let sql = format!(
        "INSERT INTO sweeps SELECT id, name, 'completed', 'store_bench', now(), now(), '{{}}', \
             'idx:bulk', '{{}}', 'bulk-recipe', '[1,2,3,4,5]', 3, points, 0, points \
         FROM (VALUES ($1::uuid, 'bulk', {designs}::bigint), ($2, 'bulk-medium', $3)) \
             AS s(id, name, points)"
    );
    let query = sqlx::query(&sql)
        .bind(big.0)
        .bind(medium.0)
        .bind(medium_designs);
    timed(conn, "sweeps", query).await?;
    let sql = format!(
        "INSERT INTO grid_points SELECT s.id, i, 'basic', 'paper', 0.1 + (i % 50) * 0.01, \
             '[1,1,1,8]', 10, 5000000, NULL, 224, {design}, NULL, 1.0 \
         FROM generate_series(1::bigint, {designs}) AS i \
             JOIN (VALUES ($1::uuid, {designs}::bigint), ($2, $3)) AS s(id, points) \
             ON i <= s.points"
    );
    let query = sqlx::query(&sql)
        .bind(big.0)
        .bind(medium.0)
        .bind(medium_designs);
    timed(conn, "grid points", query).await?;
    let sql = format!(
        "INSERT INTO trials SELECT gen_random_uuid(), {design}, 'bulk-recipe', 'idx:bulk', \
             seed, '{{}}', 'succeeded', 3, 0, 0, 0, now(), now(), now() \
         FROM generate_series(1::bigint, {designs}) AS i, \
             generate_series(1::bigint, {BULK_SEEDS}) AS seed"
    );
    timed(conn, "trials", sqlx::query(&sql)).await?;
    let query = sqlx::query(
        "INSERT INTO sweep_trials SELECT $1, id FROM trials WHERE recipe_hash = 'bulk-recipe' \
         UNION ALL SELECT $2, id FROM trials WHERE recipe_hash = 'bulk-recipe' \
             AND substr(design_id, 6)::bigint <= $3",
    );
    let query = query.bind(big.0).bind(medium.0).bind(medium_designs);
    timed(conn, "sweep links", query).await?;
    let query = sqlx::query("INSERT INTO workers VALUES ($1, 'bulk', '[]', 1, now(), now())");
    timed(conn, "worker", query.bind(worker.0)).await?;
    let query = sqlx::query(
        "INSERT INTO attempts (id, trial_id, worker_id, lease_token, state, leased_at, \
             heartbeat_at, lease_expires_at, finished_at) \
         SELECT gen_random_uuid(), id, $1, gen_random_uuid(), 'succeeded', now(), now(), now(), \
             now() FROM trials WHERE recipe_hash = 'bulk-recipe'",
    );
    timed(conn, "attempts", query.bind(worker.0)).await?;
    let query = sqlx::query(
        "INSERT INTO results SELECT trial_id, id, 0.4 + 0.5 * random(), 0.9 + 0.1 * random(), \
             0.5, 60, 10, 'bulk', NULL, now() FROM attempts WHERE worker_id = $1",
    );
    timed(conn, "results", query.bind(worker.0)).await?;
    let query = sqlx::query(
        "INSERT INTO design_scores (design_id, dataset, recipe_hash, seeds, top1_mean, \
             top1_m2, top5_mean, updated_at, family) \
         SELECT t.design_id, t.dataset, t.recipe_hash, count(*), avg(r.top1), \
             var_pop(r.top1) * count(*), avg(r.top5), now(), min(d.family) \
         FROM results r JOIN trials t ON t.id = r.trial_id JOIN designs d ON d.id = t.design_id \
         WHERE t.recipe_hash = 'bulk-recipe' \
         GROUP BY t.design_id, t.dataset, t.recipe_hash",
    );
    timed(conn, "scores", query).await?;
    // The per-sweep aggregates, as migration 0003 fills them from stored results.
    let query = sqlx::query(
        "WITH sweep_results AS ( \
             SELECT st.sweep_id, t.design_id, t.dataset, t.recipe_hash, r.top1, r.top5 \
             FROM sweep_trials st \
                 JOIN trials t ON t.id = st.trial_id \
                 JOIN results r ON r.trial_id = t.id \
             WHERE t.recipe_hash = 'bulk-recipe'), \
         groups AS ( \
             SELECT sweep_id, design_id, dataset, recipe_hash, count(*) AS seeds, \
                 avg(top1) AS top1_mean, avg(top5) AS top5_mean \
             FROM sweep_results GROUP BY sweep_id, design_id, dataset, recipe_hash) \
         INSERT INTO sweep_scores (sweep_id, design_id, dataset, recipe_hash, family, seeds, \
             top1_mean, top1_m2, top5_mean, updated_at) \
         SELECT g.sweep_id, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, \
             g.top1_mean, sum((r.top1 - g.top1_mean) * (r.top1 - g.top1_mean)), g.top5_mean, \
             now() \
         FROM groups g \
             JOIN sweep_results r ON r.sweep_id = g.sweep_id AND r.design_id = g.design_id \
                 AND r.dataset = g.dataset AND r.recipe_hash = g.recipe_hash \
             JOIN designs d ON d.id = g.design_id \
         GROUP BY g.sweep_id, g.design_id, g.dataset, g.recipe_hash, d.family, g.seeds, \
             g.top1_mean, g.top5_mean",
    );
    timed(conn, "sweep scores", query).await?;
    timed(conn, "analyze", sqlx::query("ANALYZE")).await?;
    Ok(medium)
}

/// Runs one bulk-load statement and logs how long it took.
async fn timed(
    conn: &mut PgConnection,
    label: &str,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    query
        .execute(&mut *conn)
        .await
        .with_context(|| format!("bulk load: {label}"))?;
    eprintln!(
        "bulk load: {label:<12} {:>7.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Times each leaderboard query 30 times (after one warm-up).
async fn time_leaderboards(
    store: &Store,
    medium_sweep: SweepId,
) -> anyhow::Result<Vec<(String, Timings)>> {
    let filters = [
        ("all, top 100", LeaderboardFilter::default()),
        (
            "dataset",
            LeaderboardFilter {
                dataset: Some("idx:bulk".to_string()),
                ..LeaderboardFilter::default()
            },
        ),
        (
            "family",
            LeaderboardFilter {
                family: Some("mbconv".to_string()),
                ..LeaderboardFilter::default()
            },
        ),
        (
            "params 1M..2M",
            LeaderboardFilter {
                min_params: Some(1_000_000),
                max_params: Some(2_000_000),
                ..LeaderboardFilter::default()
            },
        ),
        (
            "sweep (10k)",
            LeaderboardFilter {
                sweep: Some(medium_sweep),
                ..LeaderboardFilter::default()
            },
        ),
    ];
    let mut timings = Vec::new();
    for (label, filter) in filters {
        store.leaderboard(&filter).await?;
        let mut samples = Vec::with_capacity(30);
        for _ in 0..30 {
            let started = Instant::now();
            let rows = store.leaderboard(&filter).await?;
            samples.push(started.elapsed());
            anyhow::ensure!(!rows.is_empty(), "leaderboard {label} is empty");
        }
        timings.push((format!("leaderboard {label}"), Timings::new(samples)));
    }
    Ok(timings)
}

/// Times the leaderboard as a plain GROUP BY over every result, for comparison with the
/// `design_scores` aggregates the store reads.
async fn time_plain_group_by(conn: &mut PgConnection) -> anyhow::Result<Timings> {
    let mut samples = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        sqlx::query(
            "SELECT t.design_id, t.dataset, t.recipe_hash, avg(r.top1) AS top1_mean, \
                 stddev_pop(r.top1), avg(r.top5), count(*) \
             FROM results r JOIN trials t ON t.id = r.trial_id \
             GROUP BY t.design_id, t.dataset, t.recipe_hash \
             ORDER BY top1_mean DESC LIMIT 100",
        )
        .fetch_all(&mut *conn)
        .await?;
        samples.push(started.elapsed());
    }
    Ok(Timings::new(samples))
}

/// Sorted latency samples.
struct Timings {
    samples: Vec<Duration>,
}

impl Timings {
    fn new(mut samples: Vec<Duration>) -> Timings {
        samples.sort();
        Timings { samples }
    }

    /// Returns the `q` quantile in milliseconds (nearest rank).
    fn ms(&self, q: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.samples.len() as f64).ceil() as usize).clamp(1, self.samples.len());
        self.samples[rank - 1].as_secs_f64() * 1e3
    }
}

impl Report {
    fn print(&self, settings: &BenchSettings) {
        println!(
            "store benchmark: postgres, pool {} connections, {WORKERS} workers, {} s per load phase",
            settings.pool,
            settings.phase.as_secs()
        );
        println!("{:<40} {:>22} {:>14}", "measure", "value", "target");
        let rate = |load: &LoadOutcome| load.cycles as f64 / load.elapsed.as_secs_f64();
        let row = |name: &str, value: String, target: &str| {
            println!("{name:<40} {value:>22} {target:>14}");
        };
        row(
            "create sweep (load trials)",
            format!("{:.0} ms", ms(self.sweep_create)),
            "",
        );
        let paced = format!("paced at {}/s", settings.rate);
        for (label, load) in [
            ("saturated", &self.saturated),
            (paced.as_str(), &self.paced),
        ] {
            row(
                &format!("{label}: lease+complete cycles/s"),
                format!("{:.0}", rate(load)),
                ">= 2000",
            );
            row(
                &format!("{label}: claim p50 / p99"),
                format!(
                    "{:.1} / {:.1} ms",
                    load.claim_latency.ms(0.5),
                    load.claim_latency.ms(0.99)
                ),
                "p99 < 20 ms",
            );
            row(
                &format!("{label}: cycle p50 / p99"),
                format!(
                    "{:.1} / {:.1} ms",
                    load.cycle_latency.ms(0.5),
                    load.cycle_latency.ms(0.99)
                ),
                "",
            );
        }
        row(
            &format!("bulk load of {} results", self.results),
            format!("{:.1} s", self.bulk_load.as_secs_f64()),
            "",
        );
        for (label, timings) in &self.leaderboards {
            row(
                &format!("{label}: p50 / p99"),
                format!("{:.1} / {:.1} ms", timings.ms(0.5), timings.ms(0.99)),
                "< 50 ms",
            );
        }
        row(
            "plain GROUP BY over all results (median)",
            format!("{:.0} ms", self.plain_group_by.ms(0.5)),
            "(comparison)",
        );
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
