//! Overload is shed, not queued: ten times the sustainable Append rate for
//! 30 s keeps the process's memory bounded, answers the excess fast with
//! RESOURCE_EXHAUSTED (or UNAVAILABLE), loses no acknowledged event, and
//! leaves the service healthy.
//!
//! The service's capacity is set by a slow primary, not by CPU: the
//! PostgreSQL primary is reached through a proxy that adds
//! [`DB_DELAY`] each way, and `MESH_MAX_IN_FLIGHT` is [`IN_FLIGHT`]. On two
//! cores shared by the load generator, the service and PostgreSQL, a
//! CPU-bound service has no "ten times" that a generator on the same cores
//! could offer; a dependency that is slow but answers is also the usual way
//! a service meets more calls than it can finish. `MESH_QUEUE_WAIT_MS` is
//! [`QUEUE_WAIT_MS`], the runtime's default, not the service's own 250 ms
//! (which serves callers that come straight back better, see
//! `config::QUEUE_WAIT`): what is tested is that the queue wait bounds how
//! long a refusal takes. The other admission settings are the defaults.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_proto::audit::audit_service_client::AuditServiceClient;
use mesh_testkit::{Infra, Process};
use tonic::{Code, transport::Channel};

use crate::helpers::{SERVED, append, event, owner_conn};

/// Added by the proxy in front of the primary, each way.
const DB_DELAY: Duration = Duration::from_millis(5);

/// `MESH_MAX_IN_FLIGHT` of the service under test.
const IN_FLIGHT: usize = 8;

/// `MESH_QUEUE_WAIT_MS` of the service under test (ms).
const QUEUE_WAIT_MS: u64 = 20;

/// Calls the generator keeps open at most (beyond: it skips and says so).
const MAX_OUTSTANDING: usize = 8192;

/// Longest a caller waits for an answer (a call still unanswered then is a failure).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    mesh_testkit::rss_kib(pid).expect("the service runs: VmRSS")
}

/// Samples the RSS of `pid` every 200 ms until `stop`; the largest seen.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0;
        while !stop.load(Ordering::Relaxed) {
            max = max.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        max.max(rss_kib(pid))
    })
}

/// What the callers saw.
#[derive(Debug, Default)]
struct Outcomes {
    /// (sequence, id) of every acknowledged Append.
    acked: Mutex<Vec<(u64, String)>>,
    accepted_us: Mutex<Vec<u64>>,
    rejected_us: Mutex<Vec<u64>>,
    other: Mutex<HashMap<Code, u64>>,
    next_key: AtomicU64,
}

impl Outcomes {
    async fn one(&self, c: &mut AuditServiceClient<Channel>) {
        let key = format!("ov-{}", self.next_key.fetch_add(1, Ordering::Relaxed));
        let start = Instant::now();
        let r = tokio::time::timeout(CALL_TIMEOUT, append(c, event("overload", "overload.test"), &key)).await;
        let us = start.elapsed().as_micros() as u64;
        let Ok(r) = r else {
            *self.other.lock().unwrap().entry(Code::DeadlineExceeded).or_default() += 1;
            return;
        };
        match r {
            Ok(a) => {
                self.acked.lock().unwrap().push((a.sequence, a.id));
                self.accepted_us.lock().unwrap().push(us);
            }
            Err(s) if matches!(s.code(), Code::ResourceExhausted | Code::Unavailable) => {
                self.rejected_us.lock().unwrap().push(us);
            }
            Err(s) => *self.other.lock().unwrap().entry(s.code()).or_default() += 1,
        }
    }
}

/// The `q` quantile of `v` (sorted in place), in ms.
fn quantile_ms(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0
}

/// Closed loop: `callers` calling back to back for `run`; Appends acknowledged per second.
async fn closed_loop(
    clients: &[AuditServiceClient<Channel>],
    outcomes: &Arc<Outcomes>,
    callers: usize,
    run: Duration,
) -> f64 {
    let before = outcomes.acked.lock().unwrap().len();
    let until = Instant::now() + run;
    let tasks: Vec<_> = (0..callers)
        .map(|n| {
            let mut c = clients[n % clients.len()].clone();
            let outcomes = outcomes.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    outcomes.one(&mut c).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (outcomes.acked.lock().unwrap().len() - before) as f64 / run.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_sustainable_rate_is_shed_fast_with_bounded_memory_and_no_acknowledged_event_lost() {
    let _t = mesh_testkit::init_telemetry();
    let infra = Infra::shared();
    let db = mesh_testkit::TestDb::new(infra).await.unwrap();
    let addr = mesh_testkit::free_addr();
    let primary: std::net::SocketAddr = ([127, 0, 0, 1], infra.pg_primary_port).into();
    let slow = mesh_testkit::LatencyProxy::start(primary, DB_DELAY).await.unwrap();
    let mut env = vec![
        ("MESH_LISTEN_ADDR".to_owned(), addr.to_string()),
        ("MESH_METRICS_ADDR".to_owned(), mesh_testkit::free_addr().to_string()),
        ("MESH_MAX_IN_FLIGHT".to_owned(), IN_FLIGHT.to_string()),
        ("MESH_QUEUE_WAIT_MS".to_owned(), QUEUE_WAIT_MS.to_string()),
    ];
    for (k, v) in infra.env(&db.schema, &mesh_testkit::redis_prefix()) {
        let v = match k.as_str() {
            "MESH_DATABASE_WRITE_URL" => {
                v.replace(&format!(":{}/", infra.pg_primary_port), &format!(":{}/", slow.addr().port()))
            }
            _ => v,
        };
        env.push((k, v));
    }
    let process = Process::start(env!("CARGO_BIN_EXE_mesh-audit"), &env).unwrap();
    let pid = process.id().unwrap();
    mesh_testkit::conformance::assert_serving(addr, SERVED, Duration::from_secs(20)).await.unwrap();
    // Enough connections that no client queues calls behind HTTP/2's
    // stream limit: what queues, queues in the server.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(AuditServiceClient::new(mesh_testkit::channel(addr).await));
    }
    let outcomes = Arc::new(Outcomes::default());

    // The sustainable rate: the best of a short closed-loop ladder, and the
    // RSS at that load.
    let stop = Arc::new(AtomicBool::new(false));
    let rss_watch = watch_rss(pid, stop.clone());
    let mut sustainable: f64 = 0.0;
    for callers in [IN_FLIGHT, 2 * IN_FLIGHT, 8 * IN_FLIGHT] {
        let rate = closed_loop(&clients, &outcomes, callers, Duration::from_secs(2)).await;
        eprintln!("{callers} callers: {rate:.0} appends/s");
        sustainable = sustainable.max(rate);
    }
    stop.store(true, Ordering::Relaxed);
    let rss_sustainable = rss_watch.await.unwrap();
    let ladder_rejected = outcomes.rejected_us.lock().unwrap().len();
    outcomes.accepted_us.lock().unwrap().clear();
    outcomes.rejected_us.lock().unwrap().clear();

    // Open loop at ten times that rate for 30 s: calls start on schedule
    // whatever happened to the earlier ones.
    let target = sustainable * 10.0;
    let run = Duration::from_secs(30);
    let stop = Arc::new(AtomicBool::new(false));
    let rss_watch = watch_rss(pid, stop.clone());
    let started = Instant::now();
    let mut sent = 0u64;
    let mut skipped = 0u64;
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut report = Instant::now();
    while started.elapsed() < run {
        tick.tick().await;
        while calls.try_join_next().is_some() {}
        let due = (started.elapsed().as_secs_f64() * target) as u64;
        while sent + skipped < due {
            // A generator that cannot keep up says so instead of piling up
            // calls of its own.
            if calls.len() >= MAX_OUTSTANDING {
                skipped += 1;
                continue;
            }
            let mut c = clients[sent as usize % clients.len()].clone();
            let outcomes = outcomes.clone();
            calls.spawn(async move { outcomes.one(&mut c).await });
            sent += 1;
        }
        if report.elapsed() >= Duration::from_secs(5) {
            report = Instant::now();
            eprintln!(
                "{:?}: sent {sent}, skipped {skipped}, outstanding {}, accepted {}, rejected {}, RSS {} MiB",
                started.elapsed(),
                calls.len(),
                outcomes.accepted_us.lock().unwrap().len(),
                outcomes.rejected_us.lock().unwrap().len(),
                rss_kib(pid) / 1024
            );
        }
    }
    let offered = sent as f64 / started.elapsed().as_secs_f64();
    while calls.join_next().await.is_some() {}
    stop.store(true, Ordering::Relaxed);
    let rss_overload = rss_watch.await.unwrap();

    let mut accepted = std::mem::take(&mut *outcomes.accepted_us.lock().unwrap());
    let mut rejected = std::mem::take(&mut *outcomes.rejected_us.lock().unwrap());
    let other = outcomes.other.lock().unwrap().clone();
    let (acc_p50, acc_p99) = (quantile_ms(&mut accepted, 0.5), quantile_ms(&mut accepted, 0.99));
    let (rej_p50, rej_p99) = (quantile_ms(&mut rejected, 0.5), quantile_ms(&mut rejected, 0.99));
    eprintln!(
        "sustainable {sustainable:.0}/s (ladder rejected {ladder_rejected}); offered {offered:.0}/s for {run:?} \
         ({skipped} skipped): \
         {} accepted ({:.0}/s, p50 {acc_p50:.1} ms, p99 {acc_p99:.1} ms), {} rejected (p50 {rej_p50:.1} ms, \
         p99 {rej_p99:.1} ms), other {other:?}; RSS {} MiB at the sustainable rate, {} MiB at most in overload",
        accepted.len(),
        accepted.len() as f64 / run.as_secs_f64(),
        rejected.len(),
        rss_sustainable / 1024,
        rss_overload / 1024,
    );

    // The generator kept up well past the sustainable rate, and the excess
    // was refused, not queued.
    assert!(offered >= 9.0 * sustainable, "offered {offered:.0}/s, sustainable {sustainable:.0}/s");
    assert!(other.is_empty(), "only RESOURCE_EXHAUSTED or UNAVAILABLE may refuse an Append: {other:?}");
    assert!(rejected.len() as f64 >= 0.5 * sent as f64, "{} of {sent} rejected", rejected.len());
    // The excess does not crowd out the work the service can do.
    let goodput = accepted.len() as f64 / run.as_secs_f64();
    assert!(
        goodput >= 0.5 * sustainable,
        "{goodput:.0} appends/s accepted in overload, {sustainable:.0}/s sustainable"
    );
    // Rejections are fast: about the queue wait (20 ms) plus the trip,
    // while an accepted call waits its turn for a slot and then the slow primary.
    assert!(rej_p99 <= 0.5 * acc_p99, "rejected p99 {rej_p99:.1} ms, accepted p99 {acc_p99:.1} ms");
    assert!(rej_p99 < 250.0, "rejected p99 {rej_p99:.1} ms");
    // Memory stays bounded: what the server holds is bounded by the calls in
    // flight and the short queue, not by the offered load, so overload costs
    // at most what the sustainable load did again plus a margin (allocator
    // arenas, HTTP/2 buffers of the refused calls' streams).
    assert!(
        rss_overload < 2 * rss_sustainable + 64 * 1024,
        "RSS {rss_overload} KiB in overload, {rss_sustainable} KiB at the sustainable rate"
    );

    // Healthy afterwards: ready, and a normal Append succeeds.
    mesh_testkit::conformance::assert_serving(addr, SERVED, Duration::from_secs(10)).await.unwrap();
    let mut c = clients[0].clone();
    let last = append(&mut c, event("after", "overload.after"), "after-overload").await.unwrap();
    outcomes.acked.lock().unwrap().push((last.sequence, last.id));

    // Every acknowledged event is stored.
    let acked = std::mem::take(&mut *outcomes.acked.lock().unwrap());
    let mut owner = owner_conn(infra, &db.schema).await;
    let rows: Vec<(i64, uuid::Uuid)> =
        sqlx::query_as("select sequence, id from audit_events").fetch_all(&mut owner).await.unwrap();
    let stored: HashMap<u64, String> = rows.into_iter().map(|(s, id)| (s as u64, id.to_string())).collect();
    let missing: Vec<_> = acked.iter().filter(|(s, id)| stored.get(s) != Some(id)).collect();
    eprintln!("{} acknowledged, {} stored", acked.len(), stored.len());
    assert!(missing.is_empty(), "{} acknowledged events missing, e.g. {:?}", missing.len(), missing.first());
    process.terminate().unwrap();
}
