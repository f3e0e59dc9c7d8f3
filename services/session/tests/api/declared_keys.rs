//! Every Lua script the service runs touches only keys it declares in KEYS,
//! as Redis Cluster requires (issue 11, fault 1).
//!
//! MONITOR on every master of the shared cluster records each script call
//! (`EVALSHA`/`EVAL` with its KEYS) followed by the commands the script ran
//! (`[0 lua] ...`); scripts are atomic, so nothing else comes in between,
//! whatever other tests do meanwhile. Redis itself (`COMMAND GETKEYS`) says
//! which keys each of those commands touched (a command without arguments,
//! such as `TIME`, has none). Only calls whose command line carries this
//! test's key prefix (in KEYS or ARGV) are checked. Shard channels
//! (`SPUBLISH`) are not keys to `COMMAND GETKEYS` and are not checked.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use fred::{
    prelude::{Client, ClientLike, Config as FredConfig, ServerConfig as FredServer, Value},
    types::{ClusterHash, CustomCommand},
};
use mesh_proto::session::{RefreshSessionRequest, RevokeUserSessionsRequest};
use mesh_session::token::{Bucket, Token};
use mesh_testkit::{Infra, TestDb, redis_prefix};
use tokio::{io::AsyncBufReadExt, process::Child, task::JoinHandle};
use tonic::Code;

use crate::helpers::{
    Fixture, by_id, by_token, config_with_prefix, create, eventually, list, masters, ms, scan_cluster,
    validate,
};

/// Script calls (by their first argument, upper case) that MONITOR shows
/// before the commands they run.
const SCRIPT_CALLS: &[&str] = &["EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"];

/// One command line MONITOR printed: who sent it (`lua` for a script) and its arguments.
#[derive(Debug, PartialEq)]
struct Line {
    client: String,
    args: Vec<Vec<u8>>,
}

/// Parses a MONITOR line: `<time> [<db> <client>] "arg" "arg" ...`, each
/// argument quoted as `sdscatrepr` does (`\\ \" \n \r \t \a \b \xHH`).
fn parse_line(line: &str) -> Option<Line> {
    let open = line.find(" [")?;
    let close = open + line[open..].find("] \"")?;
    let inner = &line[open + 2..close];
    let client = inner.split_once(' ')?.1.to_owned();
    let mut rest = &line.as_bytes()[close + 2..];
    let mut args = Vec::new();
    while !rest.is_empty() {
        let (arg, after) = parse_quoted(rest)?;
        args.push(arg);
        rest = match after {
            [] => after,
            [b' ', more @ ..] => more,
            _ => return None,
        };
    }
    (!args.is_empty()).then_some(Line { client, args })
}

/// One quoted argument at the start of `s`; the argument and what follows it.
fn parse_quoted(s: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let [b'"', rest @ ..] = s else { return None };
    let mut s = rest;
    let mut out = Vec::new();
    loop {
        match s {
            [b'"', rest @ ..] => return Some((out, rest)),
            [b'\\', b'x', h, l, rest @ ..] => {
                let hex = std::str::from_utf8(&[*h, *l]).ok().and_then(|x| u8::from_str_radix(x, 16).ok())?;
                out.push(hex);
                s = rest;
            }
            [b'\\', c, rest @ ..] => {
                out.push(match c {
                    b'\\' => b'\\',
                    b'"' => b'"',
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'a' => 0x07,
                    b'b' => 0x08,
                    _ => return None,
                });
                s = rest;
            }
            [c, rest @ ..] => {
                out.push(*c);
                s = rest;
            }
            [] => return None,
        }
    }
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn upper(b: &[u8]) -> String {
    show(b).to_ascii_uppercase()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `redis-cli monitor` on one master. Its reader keeps the lines that carry
/// `keep` (and the script commands that follow them), and the marker lines.
struct Monitor {
    port: u16,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Monitor {
    fn start(port: u16, keep: String, marker: String) -> Self {
        let mut child = tokio::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-cli monitor starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = lines.clone();
        let reader = tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(stdout);
            let mut buf = Vec::new();
            let mut in_kept = false;
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                let lua = line.contains(" [0 lua] ");
                if !lua {
                    in_kept = line.contains(&keep);
                }
                if in_kept || line.contains(&marker) {
                    out.lock().unwrap().push(line);
                }
            }
        });
        Self { port, child, lines, reader }
    }

    fn saw(&self, marker: &str) -> bool {
        self.lines.lock().unwrap().iter().rev().any(|l| l.contains(marker))
    }

    /// Stops the monitor; the kept lines up to `end`.
    async fn stop(mut self, end: &str) -> Vec<String> {
        self.child.kill().await.expect("monitor stops");
        self.reader.await.expect("reader ends");
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        let n = lines.iter().position(|l| l.contains(end)).expect("end marker kept");
        lines.into_iter().take(n).collect()
    }
}

/// A plain connection to one node (no cluster routing).
async fn node(port: u16) -> Client {
    let config = FredConfig { server: FredServer::new_centralized("127.0.0.1", port), ..Default::default() };
    let client = Client::new(config, None, None, None);
    client.init().await.expect("connects to a redis node");
    client
}

async fn command(client: &Client, args: &[Vec<u8>]) -> Result<Value, fred::error::Error> {
    let name = match upper(&args[0]).as_str() {
        "ECHO" => "ECHO",
        "EVAL" => "EVAL",
        "EVALSHA" => "EVALSHA",
        "COMMAND" => "COMMAND",
        other => panic!("unexpected command {other}"),
    };
    let rest: Vec<Value> = args[1..].iter().map(|a| Value::Bytes(a.clone().into())).collect();
    client.custom(CustomCommand::new_static(name, ClusterHash::Random, false), rest).await
}

/// The keys `args` (a command line) touches, as Redis says.
async fn keys_of(
    client: &Client,
    cache: &mut HashMap<Vec<Vec<u8>>, Vec<Vec<u8>>>,
    args: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    if let Some(k) = cache.get(args) {
        return k.clone();
    }
    if args.len() == 1 {
        // No arguments, no keys (`COMMAND GETKEYS TIME` is an arity error).
        return Vec::new();
    }
    let mut q = vec![b"COMMAND".to_vec(), b"GETKEYS".to_vec()];
    q.extend(args.iter().cloned());
    let keys = match command(client, &q).await {
        Ok(v) => v.into_array().iter().map(|k| k.as_bytes().expect("a key name").to_vec()).collect(),
        Err(e) if e.details().contains("no key arguments") => Vec::new(),
        Err(e) => panic!("COMMAND GETKEYS {:?}: {e}", show(&args[0])),
    };
    cache.insert(args.to_vec(), keys.clone());
    keys
}

/// File names under `src/lua`.
fn lua_files() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lua");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("src/lua")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lua"))
        .collect();
    names.sort();
    names
}

fn common_lua() -> Option<String> {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lua/common.lua")).ok()
}

/// What each script's SHA-1 is: `lua/<name>.lua`, alone or after
/// `common.lua`, with its first line.
fn script_names() -> HashMap<String, String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lua");
    let common = common_lua().expect("src/lua/common.lua");
    let mut names = HashMap::new();
    for name in lua_files() {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let first = text.lines().next().unwrap_or_default().to_owned();
        let label = format!("lua/{name} (`{first}`)");
        names.insert(fred::util::sha1_hash(&text), label.clone());
        names.insert(fred::util::sha1_hash(&format!("{common}{text}")), label);
    }
    names
}

/// A script call and the commands it ran.
struct Call {
    port: u16,
    head: Vec<Vec<u8>>,
    keys: Vec<Vec<u8>>,
    ran: Vec<Vec<Vec<u8>>>,
}

impl Call {
    /// Its identity: the SHA-1 (of the source, for EVAL).
    fn sha(&self) -> String {
        if upper(&self.head[0]).starts_with("EVALSHA") {
            show(&self.head[1]).to_ascii_lowercase()
        } else {
            fred::util::sha1_hash(&show(&self.head[1]))
        }
    }

    fn name(&self, names: &HashMap<String, String>) -> String {
        let sha = self.sha();
        match names.get(&sha) {
            Some(n) => format!("{n} sha {sha}"),
            None if upper(&self.head[0]).starts_with("EVALSHA") => format!("unknown script sha {sha}"),
            None => {
                // The first line of its own, after the shared head if it has it.
                let src = show(&self.head[1]);
                let own = common_lua().and_then(|c| src.strip_prefix(&c).map(str::to_owned)).unwrap_or(src);
                format!("script `{}`", own.lines().next().unwrap_or_default())
            }
        }
    }
}

/// Groups kept MONITOR lines into script calls whose line carries `prefix`.
fn calls(port: u16, lines: &[String], prefix: &str, start: &str) -> Vec<Call> {
    let from = lines.iter().position(|l| l.contains(start)).expect("start marker kept");
    let mut out: Vec<Call> = Vec::new();
    let mut current: Option<Call> = None;
    for raw in &lines[from + 1..] {
        let line = parse_line(raw).unwrap_or_else(|| panic!("cannot parse MONITOR line {raw:?}"));
        if line.client == "lua" {
            if let Some(c) = current.as_mut() {
                c.ran.push(line.args);
            }
            continue;
        }
        out.extend(current.take());
        let name = upper(&line.args[0]);
        if SCRIPT_CALLS.contains(&name.as_str()) && line.args.iter().any(|a| contains(a, prefix.as_bytes())) {
            let n: usize = show(&line.args[2]).parse().expect("numkeys");
            let keys = line.args[3..3 + n].to_vec();
            current = Some(Call { port, head: line.args, keys, ran: Vec::new() });
        }
    }
    out.extend(current);
    out
}

fn id(r: &mesh_proto::session::CreateSessionResponse) -> String {
    r.session.as_ref().unwrap().id.clone()
}

/// Monitors on every master of the shared cluster, recording the script
/// calls that carry one key prefix.
struct Recorder {
    prefix: String,
    start: String,
    end: String,
    monitors: Vec<Monitor>,
    nodes: BTreeMap<u16, Client>,
}

/// What the script calls of a recording touched.
struct Checked {
    /// Calls per script (named by `script_names`).
    seen: BTreeMap<String, usize>,
    /// Kinds of keys touched (`s`, `t`, `u`, ...: what follows `}:`).
    kinds: BTreeSet<String>,
    /// One line per (script, command) that touched a key it did not declare.
    undeclared: Vec<String>,
}

impl Recorder {
    /// Starts a monitor on every master; returns once each is live.
    async fn start(prefix: &str) -> Self {
        let mark = format!("declared-keys-mark-{prefix}");
        let (start, end) = (format!("{mark}start"), format!("{mark}end"));
        let ports = masters(&Infra::shared().redis_ports);
        let mut nodes = BTreeMap::new();
        for &p in &ports {
            nodes.insert(p, node(p).await);
        }
        let monitors = ports.iter().map(|&p| Monitor::start(p, prefix.to_owned(), mark.clone())).collect();
        let r = Self { prefix: prefix.to_owned(), start, end, monitors, nodes };
        r.mark(&r.start, "every monitor is live").await;
        r
    }

    /// Sends `marker` to every master until each monitor has printed it.
    async fn mark(&self, marker: &str, what: &str) {
        eventually(Duration::from_secs(20), what, || async {
            let mut all = true;
            for m in &self.monitors {
                if !m.saw(marker) {
                    all = false;
                    command(&self.nodes[&m.port], &[b"ECHO".to_vec(), marker.as_bytes().to_vec()])
                        .await
                        .unwrap();
                }
            }
            all.then_some(())
        })
        .await;
    }

    /// The last script call so far whose arguments satisfy `pick`, and the
    /// master it ran on.
    fn last_call(&self, pick: impl Fn(&[Vec<u8>]) -> bool) -> Option<(u16, Vec<Vec<u8>>)> {
        self.monitors.iter().rev().find_map(|m| {
            let lines = m.lines.lock().unwrap();
            lines
                .iter()
                .rev()
                .filter_map(|l| parse_line(l))
                .find(|l| {
                    l.client != "lua" && SCRIPT_CALLS.contains(&upper(&l.args[0]).as_str()) && pick(&l.args)
                })
                .map(|l| (m.port, l.args))
        })
    }

    /// Stops the monitors and checks every recorded script call's keys
    /// against its KEYS.
    async fn finish(self) -> Checked {
        self.mark(&self.end, "every monitor reaches the end marker").await;
        let mut all = Vec::new();
        for m in self.monitors {
            let port = m.port;
            let lines = m.stop(&self.end).await;
            all.extend(calls(port, &lines, &self.prefix, &self.start));
        }
        let names = script_names();
        let mut cache = HashMap::new();
        let mut kinds = BTreeSet::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        // (script, command) -> (an undeclared key, the declared keys, count).
        let mut undeclared: BTreeMap<(String, String), (String, Vec<String>, usize)> = BTreeMap::new();
        for call in &all {
            let name = call.name(&names);
            *seen.entry(name.clone()).or_default() += 1;
            for cmd in &call.ran {
                for key in keys_of(&self.nodes[&call.port], &mut cache, cmd).await {
                    let k = show(&key);
                    if let Some((_, rest)) = k.split_once("}:") {
                        kinds.insert(rest.split(':').next().unwrap_or_default().to_owned());
                    }
                    if !call.keys.contains(&key) {
                        let first = call.ran.first().map(|c| upper(&c[0])).unwrap_or_default();
                        let entry = undeclared
                            .entry((format!("{name}, first command {first}"), upper(&cmd[0])))
                            .or_insert_with(|| (k, call.keys.iter().map(|k| show(k)).collect(), 0));
                        entry.2 += 1;
                    }
                }
            }
        }
        let undeclared = undeclared
            .into_iter()
            .map(|((script, cmd), (key, declared, n))| {
                format!("{script}: {cmd} {key:?} not declared; KEYS {declared:?} ({n} calls)")
            })
            .collect();
        Checked { seen, kinds, undeclared }
    }
}

#[tokio::test]
async fn every_script_touches_only_the_keys_it_declares() {
    let _t = mesh_testkit::init_telemetry();
    let infra = Infra::shared();
    let prefix = redis_prefix();
    let rec = Recorder::start(&prefix).await;

    let db = TestDb::new(infra).await.unwrap();
    let audit = crate::audit::spawn_audit(&db, "127.0.0.1:0".parse().unwrap()).await;
    let mut config = config_with_prefix(infra, &prefix);
    config.clients.audit = Some(audit.addr.to_string().parse().unwrap());
    config.session.max_per_user = 2;
    // Every validation goes to Redis; a touch is due 1 ms after the last.
    config.session.cache_max_bytes = 0;
    config.session.touch_interval = Duration::from_millis(1);
    config.session.outbox_sweep = Duration::from_secs(1);
    let mut f = Fixture::new(config).await;
    let user = "uma";

    // Create past the cap of 2: the oldest is evicted.
    let a = create(&mut f.c, user).await;
    let b = create(&mut f.c, user).await;
    let c = create(&mut f.c, user).await;
    assert_eq!(validate(&mut f.c, &a.token, false).await, Err(Code::Unauthenticated), "evicted");
    assert_eq!(list(&mut f, user).await, [id(&c), id(&b)]);

    // Validate without and with touch; the touch writes.
    let b0 = validate(&mut f.c, &b.token, false).await.unwrap();
    eventually(Duration::from_secs(5), "a touch writes last_seen", || async {
        let s = validate(&mut f.c.clone(), &b.token, true).await.unwrap();
        (ms(&s.last_seen_at) > ms(&b0.last_seen_at)).then_some(())
    })
    .await;

    // Refresh; the old token cannot rotate again; the very same rotation
    // sent again (as a retry would) answers the session.
    let c2 =
        f.c.refresh_session(RefreshSessionRequest { token: c.token.clone(), client: None })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(c2.session.as_ref().unwrap().id, id(&c));
    let again = f.c.refresh_session(RefreshSessionRequest { token: c.token.clone(), client: None }).await;
    assert_eq!(again.unwrap_err().code(), Code::Unauthenticated);
    let (old_hex, new_hex) =
        (Token::parse(&c.token).unwrap().1.hex(), Token::parse(&c2.token).unwrap().1.hex());
    let (port, rotation) = rec
        .last_call(|args| {
            args.iter().any(|a| a.ends_with(format!("t:{old_hex}").as_bytes()))
                && args.iter().any(|a| *a == new_hex.as_bytes())
        })
        .expect("the rotation's script call was seen");
    match command(&rec.nodes[&port], &rotation).await {
        Ok(v) => {
            assert!(format!("{v:?}").contains(&id(&c)), "the retried rotation answers the session: {v:?}")
        }
        // The script asks for keys to be declared before touching them: also right.
        Err(e) if e.details().contains("NEEDKEYS") => eprintln!("the retried rotation asked for keys: {e}"),
        Err(e) => panic!("the retried rotation failed: {e}"),
    }
    assert_eq!(validate(&mut f.c, &c2.token, true).await.unwrap().id, id(&c));
    assert_eq!(list(&mut f, user).await, [id(&c), id(&b)]);

    // Revoke by token and by id.
    assert!(f.c.revoke_session(by_token(&c2.token)).await.unwrap().into_inner().revoked);
    let d = create(&mut f.c, user).await;
    assert!(f.c.revoke_session(by_id(&id(&b))).await.unwrap().into_inner().revoked);
    assert!(!f.c.revoke_session(by_id(&id(&b))).await.unwrap().into_inner().revoked);
    assert_eq!(list(&mut f, user).await, [id(&d)]);

    // Revoke all but one, then all.
    let e = create(&mut f.c, user).await;
    let n =
        f.c.revoke_user_sessions(RevokeUserSessionsRequest {
            user_id: user.into(),
            except_session_id: Some(id(&e)),
            client: None,
        })
        .await
        .unwrap()
        .into_inner()
        .revoked;
    assert_eq!(n, 1);
    let g = create(&mut f.c, user).await;
    let n =
        f.c.revoke_user_sessions(RevokeUserSessionsRequest { user_id: user.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .revoked;
    assert_eq!(n, 2);
    assert!(list(&mut f, user).await.is_empty());

    // Revoked and unknown tokens.
    let unknown = Token::generate(Bucket::of_user(user));
    for t in [&a.token, &b.token, &c.token, &c2.token, &d.token, &e.token, &g.token, unknown.expose()] {
        assert_eq!(validate(&mut f.c, t, false).await, Err(Code::Unauthenticated));
        assert_eq!(validate(&mut f.c, t, true).await, Err(Code::Unauthenticated));
    }
    assert!(!f.c.revoke_session(by_token(unknown.expose())).await.unwrap().into_inner().revoked);

    // The outbox drains: the 13 changes delivered, every outbox empty; and
    // a whole sweep (a peek of each of the 1024 buckets) runs while recorded.
    let peeks = || f.metric("mesh_session_redis_seconds_count", &["op=\"session_outbox_peek\""]);
    let peeks_before = peeks().await;
    eventually(Duration::from_secs(30), "the audit outbox drains and a sweep runs", || async {
        let delivered = f.metric("mesh_session_audit_events_total", &["result=\"delivered\""]).await;
        let outboxes = scan_cluster(&infra.redis_ports, &prefix);
        let empty = outboxes.iter().filter(|k| k.name.ends_with("}:o")).all(|k| k.content.trim().is_empty());
        let swept = peeks().await - peeks_before >= 1024.0;
        (delivered >= 13.0 && empty && swept).then_some(())
    })
    .await;
    f.app.stop().await.unwrap();
    audit.stop().await.unwrap();

    let checked = rec.finish().await;
    eprintln!("script calls seen (with this test's prefix): {:#?}", checked.seen);
    eprintln!("key kinds touched: {:?}", checked.kinds);
    for script in lua_files().into_iter().filter(|n| n != "common.lua") {
        let label = format!("lua/{script} ");
        assert!(
            checked.seen.keys().any(|s| s.starts_with(&label)),
            "{script} never ran: {:#?}",
            checked.seen
        );
    }
    for kind in ["s", "u", "t", "o"] {
        assert!(checked.kinds.contains(kind), "no script touched a `{kind}` key: {:?}", checked.kinds);
    }
    assert!(
        checked.undeclared.is_empty(),
        "scripts touched keys they did not declare:\n{}",
        checked.undeclared.join("\n")
    );
}

/// The check fails on a script that learns a key from data (the fault of
/// issue 11): it reads the session a token points to without declaring it.
#[tokio::test]
async fn a_key_learnt_from_data_fails_the_check() {
    let _t = mesh_testkit::init_telemetry();
    let prefix = redis_prefix();
    let rec = Recorder::start(&prefix).await;
    let base = format!("{prefix}{{session:7}}:");
    let (pointer, session) = (format!("{base}t:abc"), format!("{base}s:ses_1"));
    let script = "-- Injected fault: reads the session its token points to, undeclared.\n\
                  local sid = redis.call('GET', KEYS[1])\n\
                  return redis.call('HMGET', ARGV[1] .. 's:' .. sid, 'u')";
    // `-c`: to the master that serves the slot.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &Infra::shared().redis_ports[0].to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && !text.starts_with("ERR"), "redis-cli {args:?}: {text}");
    };
    cli(&["SET", &pointer, "ses_1", "PX", "60000"]);
    cli(&["EVAL", script, "1", &pointer, &base]);

    let checked = rec.finish().await;
    assert_eq!(checked.undeclared.len(), 1, "{:#?}", checked.undeclared);
    let report = &checked.undeclared[0];
    eprintln!("the check reports: {report}");
    for part in [
        "-- Injected fault",
        "first command GET",
        "HMGET",
        &format!("{session:?}"),
        &format!("[{pointer:?}]"),
    ] {
        assert!(report.contains(part), "{part} in {report}");
    }
}

#[test]
fn monitor_lines_parse_with_every_escape() {
    let l = parse_line(r#"1764497425.123456 [0 lua] "HMGET" "a\\b\"c\n\r\t\a\b\x00\xff" "x y""#).unwrap();
    assert_eq!(l.client, "lua");
    assert_eq!(l.args, [b"HMGET".to_vec(), b"a\\b\"c\n\r\t\x07\x08\x00\xff".to_vec(), b"x y".to_vec()]);
    let l = parse_line(r#"1764497425.1 [0 127.0.0.1:5000] "evalsha" "ab" "1" "k""#).unwrap();
    assert_eq!((l.client.as_str(), l.args.len()), ("127.0.0.1:5000", 4));
    let l = parse_line(r#"1.2 [0 [::1]:5000] "GET" """#).unwrap();
    assert_eq!((l.client.as_str(), l.args), ("[::1]:5000", vec![b"GET".to_vec(), Vec::new()]));
    assert_eq!(parse_line("OK"), None);
    assert_eq!(parse_line(r#"1.2 [0 lua] "unterminated"#), None);
}
