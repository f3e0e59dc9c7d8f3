//! Slots move under load — `redis-cli --cluster reshard` of a third of them,
//! and a fourth master joining with `--cluster rebalance` — and no counter
//! loses an acknowledged hit, no call is allowed over its limit, calls are
//! answered (never an error but UNAVAILABLE), and within 5 s of the cluster
//! being ok the service is ready and Redis decides again.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_proto::ratelimit::{CheckRequest, Code as Overall};
use mesh_ratelimit::DECIDED_BY;
use mesh_testkit::{PrivateInfra, eventually};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{RulesFile, check, client, config_with, desc, spawn_app};

const LIMIT: u32 = 200;
const USERS: usize = 30;
const RULES: &str = r#"
domain: closed
failure_mode: fail_closed
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 200 }
"#;

/// What the load saw.
#[derive(Debug, Default)]
struct Seen {
    /// OK answers per user.
    ok: HashMap<String, u32>,
    decided_by: HashMap<String, usize>,
    errors: Vec<String>,
}

async fn served_through(motion: &str) {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let rules = RulesFile::new(RULES);
    let app = spawn_app(config_with(&private.infra, &rules)).await;
    let c = client(&app).await;

    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Seen::default())));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (mut c, stop, seen) = (c.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::SeqCst) {
                    let user = format!("user-{}", n % USERS);
                    let req = CheckRequest {
                        domain: "closed".into(),
                        descriptors: vec![desc(&[("user", &user)], None)],
                        hits_addend: 0,
                    };
                    let r = c.check(req).await;
                    {
                        let mut seen = seen.lock().unwrap();
                        match r {
                            Ok(r) => {
                                let by = r
                                    .metadata()
                                    .get(DECIDED_BY)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned();
                                if r.get_ref().overall_code() == Overall::Ok {
                                    *seen.ok.entry(user).or_default() += 1;
                                }
                                *seen.decided_by.entry(by).or_default() += 1;
                            }
                            Err(s) if s.code() == Code::Unavailable => {
                                *seen.decided_by.entry("UNAVAILABLE".into()).or_default() += 1
                            }
                            Err(s) => seen.errors.push(format!("{:?}: {}", s.code(), s.message())),
                        }
                    }
                    n += 4;
                    // Spread over the whole motion: about 200 calls a second.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();

    let started = tokio::time::Instant::now();
    match motion {
        "reshard" => private.redis_reshard_a_third().await.unwrap(),
        _ => {
            private.redis_rebalance_onto_a_new_master().await.unwrap();
        }
    }
    let settled = tokio::time::Instant::now();
    let ch = mesh_testkit::channel(app.addr).await;
    eventually(Duration::from_secs(5), "ready, and redis decides again", || async {
        let ready = mesh_testkit::health_status(&ch, "readiness").await.ok()? == ServingStatus::Serving;
        let by = check(&mut c.clone(), "closed", vec![desc(&[("user", "probe")], Some(0))]).await.decided_by;
        (ready && by == "redis").then_some(())
    })
    .await;
    let back = settled.elapsed();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{motion} took {:?}, serving from redis {back:?} after the cluster was ok; decided by {:?}",
        settled - started,
        seen.decided_by
    );
    assert!(seen.errors.is_empty(), "errors other than UNAVAILABLE: {:?}", seen.errors);
    // Nothing allowed over the limit, and every allowed hit still counted.
    let mut c = c.clone();
    for (user, oks) in &seen.ok {
        assert!(*oks <= LIMIT, "{user} was allowed {oks} times, over {LIMIT}");
        let a = check(&mut c, "closed", vec![desc(&[("user", user)], Some(0))]).await;
        assert_eq!(a.decided_by, "redis");
        assert!(a.remaining(0) <= LIMIT - oks, "{user}: {oks} allowed, yet {} remain", a.remaining(0));
    }
    assert!(seen.ok.values().sum::<u32>() > 0, "the load ran: {seen:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn limits_hold_through_a_reshard_of_a_third_of_the_slots() {
    served_through("reshard").await;
}

#[tokio::test]
async fn limits_hold_through_a_rebalance_onto_a_new_master() {
    served_through("rebalance").await;
}
