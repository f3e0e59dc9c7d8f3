//! Slots move between masters while sessions are used: by hand, one key at a
//! time with the slot held half-moved, and by `redis-cli --cluster reshard`
//! under load. Valid tokens are never refused, no session leaves its user's
//! index, errors are UNAVAILABLE only, and readiness follows the cluster.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_proto::session::{ListUserSessionsRequest, session_service_client::SessionServiceClient};
use mesh_testkit::{PrivateInfra, redis_prefix};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{Fixture, config_with_prefix, create, eventually, validate};

/// The ids a user's ListUserSessions returns, or the error code.
async fn listed(c: &mut SessionServiceClient<Channel>, user: &str) -> Result<HashSet<String>, Code> {
    c.list_user_sessions(ListUserSessionsRequest { user_id: user.into() })
        .await
        .map(|r| r.into_inner().sessions.into_iter().map(|s| s.id).collect())
        .map_err(|s| s.code())
}

/// The slot of a user's bucket and the keys of that slot, from the master holding it.
pub(crate) async fn bucket_keys(private: &PrivateInfra, prefix: &str, user: &str) -> (u16, u16, Vec<String>) {
    for port in private.redis_masters().await.unwrap() {
        let found =
            private.redis_cli(port, &["--scan", "--pattern", &format!("{prefix}*u:{user}")]).await.unwrap();
        let Some(index) = found.lines().find(|l| !l.is_empty()) else { continue };
        let slot: u16 =
            private.redis_cli(port, &["cluster", "keyslot", index]).await.unwrap().trim().parse().unwrap();
        let keys =
            private.redis_cli(port, &["cluster", "getkeysinslot", &slot.to_string(), "1000"]).await.unwrap();
        return (slot, port, keys.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect());
    }
    panic!("no index key for {user}")
}

/// Readiness of the service right now.
async fn ready(f: &Fixture) -> bool {
    let ch = mesh_testkit::channel(f.app.addr).await;
    mesh_testkit::health_status(&ch, "readiness").await.is_ok_and(|s| s == ServingStatus::Serving)
}

/// Validations and listings of `sessions` (user, token, id) while a slot is
/// half-moved: each answer is right, or UNAVAILABLE; never a refusal or a
/// listing without the session.
async fn probe(c: &mut SessionServiceClient<Channel>, sessions: &[(String, String, String)]) -> usize {
    let mut unavailable = 0;
    for (user, token, id) in sessions {
        for touch in [true, false] {
            match validate(c, token, touch).await {
                Ok(s) => assert_eq!(&s.id, id),
                Err(Code::Unavailable) => unavailable += 1,
                Err(code) => panic!("a valid token was answered {code:?} while its slot moved"),
            }
        }
        match listed(c, user).await {
            Ok(ids) => assert!(ids.contains(id), "{id} dropped out of {user}'s index"),
            Err(Code::Unavailable) => unavailable += 1,
            Err(code) => panic!("ListUserSessions answered {code:?} while its slot moved"),
        }
    }
    unavailable
}

#[tokio::test]
async fn a_half_moved_slot_neither_wedges_the_service_nor_loses_sessions() {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let prefix = redis_prefix();
    let mut config = config_with_prefix(&private.infra, &prefix);
    // Every call goes to Redis: the cache would hide the store's behaviour.
    config.session.cache_max_bytes = 0;
    let mut f = Fixture::new(config).await;

    // Sessions of many users keep every master's connections busy meanwhile.
    let mut others = Vec::new();
    for n in 0..30 {
        let user = format!("other-{n}");
        let s = create(&mut f.c, &user).await;
        others.push((user, s.token, s.session.unwrap().id));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn({
        let (c, stop, wrong, others) = (f.c.clone(), stop.clone(), wrong.clone(), others.clone());
        async move {
            let mut tasks = Vec::new();
            for worker in 0..4 {
                let (mut c, stop, wrong, others) = (c.clone(), stop.clone(), wrong.clone(), others.clone());
                tasks.push(tokio::spawn(async move {
                    let mut n = worker;
                    while !stop.load(Ordering::SeqCst) {
                        let (_, token, id) = &others[n % others.len()];
                        match validate(&mut c, token, n % 2 == 0).await {
                            Ok(s) if &s.id == id => {}
                            Err(Code::Unavailable) => {}
                            other => wrong.lock().unwrap().push(format!("{other:?}")),
                        }
                        n += 4;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    });

    let user = "alice";
    let s = create(&mut f.c, user).await;
    let mine = vec![(user.to_owned(), s.token.clone(), s.session.unwrap().id)];
    let (slot, home, keys) = bucket_keys(&private, &prefix, user).await;
    let away = private.redis_masters().await.unwrap().into_iter().find(|p| *p != home).unwrap();

    let mut unavailable = 0;
    for (from, to) in [(home, away), (away, home)] {
        private.redis_begin_slot_move(slot, from, to).await.unwrap();
        unavailable += probe(&mut f.c, &mine).await;
        // The token's pointer and the user's index first, the session after.
        let first: Vec<String> =
            keys.iter().filter(|k| k.contains("}:t:") || k.contains("}:u:")).cloned().collect();
        assert_eq!(first.len(), 2, "{keys:?}");
        private.redis_migrate_keys(from, to, &first).await.unwrap();
        unavailable += probe(&mut f.c, &mine).await;
        private.redis_finish_slot_move(slot, from, to).await.unwrap();
        private.wait_redis_ok(Duration::from_secs(10)).await.unwrap();
        let ok_at = tokio::time::Instant::now();
        // Within 5 s of the cluster being ok: ready, and every call answers right.
        eventually(Duration::from_secs(5), "the service is ready and answers", || async {
            let mut c = f.c.clone();
            let all_ok = validate(&mut c, &mine[0].1, true).await.is_ok()
                && listed(&mut c, user).await.is_ok_and(|ids| ids.contains(&mine[0].2));
            (all_ok && ready(&f).await).then_some(())
        })
        .await;
        eprintln!(
            "slot {slot} moved {from} -> {to}: serving again {:?} after the cluster was ok",
            ok_at.elapsed()
        );
    }
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(wrong.lock().unwrap().is_empty(), "wrong answers under load: {:?}", wrong.lock().unwrap());
    assert_eq!(probe(&mut f.c, &mine).await + probe(&mut f.c, &others).await, 0, "all served again");
    eprintln!("{unavailable} calls answered UNAVAILABLE while the slot was half-moved");
    f.app.stop().await.unwrap();
}

/// What the load saw, by outcome.
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    unavailable: usize,
    /// When the last UNAVAILABLE was answered.
    last_unavailable: Option<tokio::time::Instant>,
    wrong: Vec<String>,
}

/// Validations (with and without touch) and listings of `sessions` by
/// `workers` callers until `stop`.
fn load(
    c: &SessionServiceClient<Channel>,
    sessions: &Arc<Vec<(String, String, String)>>,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Seen>>,
    workers: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (mut c, sessions, stop, seen) = (c.clone(), sessions.clone(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::SeqCst) {
                    let (user, token, id) = &sessions[n % sessions.len()];
                    let outcome = if n % 3 == 0 {
                        listed(&mut c, user).await.map(|ids| ids.contains(id))
                    } else {
                        validate(&mut c, token, n % 2 == 0).await.map(|s| &s.id == id)
                    };
                    let mut seen = seen.lock().unwrap();
                    match outcome {
                        Ok(true) => seen.ok += 1,
                        Err(Code::Unavailable) => {
                            seen.unavailable += 1;
                            seen.last_unavailable = Some(tokio::time::Instant::now());
                        }
                        Ok(false) => seen.wrong.push(format!("{id} of {user} missing")),
                        Err(code) => seen.wrong.push(format!("{code:?} for {id} of {user}")),
                    }
                    n += workers;
                }
            })
        })
        .collect()
}

/// How the slots move.
#[derive(Debug, Clone, Copy)]
enum Motion {
    /// `redis-cli --cluster reshard` of a third of the slots between two masters.
    ReshardThird,
    /// A fourth master joins, then `redis-cli --cluster rebalance`.
    RebalanceOntoNewMaster,
}

impl Motion {
    /// Moves the slots; returns once the cluster is ok again.
    async fn run(self, private: &PrivateInfra) {
        match self {
            Motion::ReshardThird => private.redis_reshard_a_third().await.unwrap(),
            Motion::RebalanceOntoNewMaster => {
                private.redis_rebalance_onto_a_new_master().await.unwrap();
            }
        }
    }
}

async fn sessions_are_served_through(motion: Motion) {
    let _t = mesh_testkit::init_telemetry();
    let private = PrivateInfra::new();
    private.start_redis().await.unwrap();
    let prefix = redis_prefix();
    let mut f = Fixture::new(config_with_prefix(&private.infra, &prefix)).await;
    let mut sessions = Vec::new();
    for n in 0..150 {
        let user = format!("user-{}", n % 75);
        let s = create(&mut f.c, &user).await;
        sessions.push((user, s.token, s.session.unwrap().id));
    }
    let sessions = Arc::new(sessions);
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Seen::default())));
    let workers = load(&f.c, &sessions, &stop, &seen, 4);

    let started = tokio::time::Instant::now();
    motion.run(&private).await;
    let settled = tokio::time::Instant::now();

    // Within 5 s of the cluster being ok: ready, and no more UNAVAILABLE.
    eventually(Duration::from_secs(5), "the service is ready", || async { ready(&f).await.then_some(()) })
        .await;
    let quiet_from = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{motion:?} took {:?}: {} right answers, {} UNAVAILABLE, the last {:?} after the cluster was ok",
        settled - started,
        seen.ok,
        seen.unavailable,
        seen.last_unavailable.map(|t| t.saturating_duration_since(settled)),
    );
    assert!(seen.wrong.is_empty(), "wrong answers: {:?}", &seen.wrong[..seen.wrong.len().min(10)]);
    assert!(seen.last_unavailable.is_none_or(|t| t < quiet_from), "UNAVAILABLE once the cluster had settled");
    assert!(seen.ok > 100, "the load ran: {seen:?}");
    // Every session is still valid and in its user's index.
    assert_eq!(probe(&mut f.c, &sessions).await, 0);
    f.app.stop().await.unwrap();
}

#[tokio::test]
async fn sessions_are_served_through_a_reshard_of_a_third_of_the_slots() {
    sessions_are_served_through(Motion::ReshardThird).await;
}

#[tokio::test]
async fn sessions_are_served_through_a_rebalance_onto_a_new_master() {
    sessions_are_served_through(Motion::RebalanceOntoNewMaster).await;
}
