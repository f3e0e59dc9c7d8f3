//! CPU time per process over a measured window, from Linux `/proc`: where
//! the machine's cycles went during a load run (load generator, service,
//! Redis, PostgreSQL), so a result can be read as "µs of CPU per call" and a
//! ratio's ceiling can be worked out from the same run.

use std::{collections::HashMap, time::Duration};

/// One process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone)]
struct Proc {
    comm: String,
    /// When it started (clock ticks after boot): with the pid, what tells one
    /// process from a later one that reuses its pid. (Not the name: kernel
    /// workers rename themselves after the work they are doing.)
    start: u64,
    /// utime + stime of every thread, in clock ticks.
    ticks: u64,
    /// The process title, for PostgreSQL's processes only (see [`ProcUse::title`]).
    title: String,
}

/// CPU counters of every process and of the whole machine at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    procs: HashMap<u32, Proc>,
    /// Machine-wide (busy, total) ticks from `/proc/stat`.
    machine: (u64, u64),
}

/// Clock ticks per second of `/proc` times: Linux has reported USER_HZ =
/// 100 to user space on every architecture for decades.
const USER_HZ: f64 = 100.0;

fn read_proc(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain spaces or ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat[open + 1..close].to_owned();
    let mut rest = stat[close + 2..].split_ascii_whitespace();
    // Fields after comm start at field 3 (state); utime and stime are 14
    // and 15, starttime is 22.
    let utime: u64 = rest.nth(11)?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    let start: u64 = rest.nth(6)?.parse().ok()?;
    // PostgreSQL's processes are all `postgres`; their titles say which is which.
    let title = if comm == "postgres" {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&raw).replace('\0', " ").trim().to_owned()
    } else {
        String::new()
    };
    Some(Proc { comm, start, ticks: utime + stime, title })
}

fn read_machine() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return (0, 0) };
    let v: Vec<u64> = line.split_ascii_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

impl Snapshot {
    /// Reads every process's counters (a few milliseconds).
    pub fn take() -> Self {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                    && let Some(p) = read_proc(pid)
                {
                    procs.insert(pid, p);
                }
            }
        }
        Self { procs, machine: read_machine() }
    }
}

/// A process's CPU time within a window.
#[derive(Debug, Clone)]
pub struct ProcUse {
    /// Process id.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`, at most 15 bytes).
    pub comm: String,
    /// CPU seconds (user + system) spent in the window.
    pub seconds: f64,
    /// For a PostgreSQL process, its title at the end of the window
    /// (`postgres: mesh mesh 127.0.0.1(5432) idle`, `postgres: checkpointer`,
    /// …; empty if it had exited); empty for every other process.
    pub title: String,
}

/// CPU use between two snapshots.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Every process that ran in the window.
    pub procs: Vec<ProcUse>,
    /// Share of all cores' time the machine was busy (0–1).
    pub machine_busy: f64,
    /// Wall time of the window.
    pub elapsed: Duration,
}

impl Usage {
    /// What happened between `before` and `after`, `elapsed` apart.
    pub fn between(before: &Snapshot, after: &Snapshot, elapsed: Duration) -> Self {
        let procs = after
            .procs
            .iter()
            .filter_map(|(&pid, p)| {
                // A process that started in the window counts from zero.
                let base = before.procs.get(&pid).filter(|b| b.start == p.start).map_or(0, |b| b.ticks);
                let ticks = p.ticks.saturating_sub(base);
                (ticks > 0).then(|| ProcUse {
                    pid,
                    comm: p.comm.clone(),
                    seconds: ticks as f64 / USER_HZ,
                    title: p.title.clone(),
                })
            })
            .collect();
        let busy = after.machine.0.saturating_sub(before.machine.0) as f64;
        let total = after.machine.1.saturating_sub(before.machine.1) as f64;
        Self { procs, machine_busy: if total > 0.0 { busy / total } else { 0.0 }, elapsed }
    }

    /// CPU seconds of the processes `which` selects.
    pub fn seconds(&self, which: impl Fn(&ProcUse) -> bool) -> f64 {
        // (+ 0.0: an empty f64 sum is -0.0)
        self.procs.iter().filter(|p| which(p)).map(|p| p.seconds).sum::<f64>() + 0.0
    }

    /// CPU seconds of this process (the load generator and whatever it
    /// serves in-process).
    pub fn this_process(&self) -> f64 {
        let me = std::process::id();
        self.seconds(|p| p.pid == me)
    }

    /// CPU seconds of every process named `comm` (e.g. `redis-server`,
    /// `postgres`: all of a server's processes).
    pub fn named(&self, comm: &str) -> f64 {
        self.seconds(|p| p.comm == comm)
    }

    /// CPU seconds of everything.
    pub fn total(&self) -> f64 {
        self.seconds(|_| true)
    }

    /// The processes `which` selects that used more than 2 % of a core, by
    /// name, busiest first: `"kworker/0:1 (12 % of a core), …"`, or `"none"`.
    pub fn busiest(&self, which: impl Fn(&ProcUse) -> bool) -> String {
        let mut by_name: HashMap<&str, f64> = HashMap::new();
        for p in self.procs.iter().filter(|p| which(p)) {
            *by_name.entry(p.comm.as_str()).or_default() += p.seconds;
        }
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut top: Vec<(&str, f64)> =
            by_name.into_iter().map(|(n, s)| (n, s / secs * 100.0)).filter(|(_, pct)| *pct > 2.0).collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        if top.is_empty() {
            return "none".to_owned();
        }
        top.iter().map(|(n, pct)| format!("{n} ({pct:.0} % of a core)")).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processes as (pid, name, start, ticks).
    fn snap(procs: &[(u32, &str, u64, u64)], machine: (u64, u64)) -> Snapshot {
        Snapshot {
            procs: procs
                .iter()
                .map(|&(pid, comm, start, ticks)| {
                    (pid, Proc { comm: comm.into(), start, ticks, title: String::new() })
                })
                .collect(),
            machine,
        }
    }

    #[test]
    fn usage_is_the_difference_per_process_and_new_processes_count_from_zero() {
        let before = snap(
            &[(1, "redis-server", 5, 100), (2, "redis-server", 5, 50), (3, "postgres", 6, 7)],
            (1000, 2000),
        );
        let after = snap(
            &[
                (1, "redis-server", 5, 130),
                (2, "redis-server", 5, 60),
                (3, "postgres", 6, 7),
                (4, "pgbench", 90, 25),
            ],
            (1150, 2200),
        );
        let u = Usage::between(&before, &after, Duration::from_secs(1));
        assert!((u.named("redis-server") - 0.40).abs() < 1e-9);
        assert!((u.named("pgbench") - 0.25).abs() < 1e-9);
        // an idle process is not listed; nothing named so sums to +0
        assert!(u.procs.iter().all(|p| p.pid != 3));
        assert_eq!(u.named("postgres").to_string(), "0");
        assert!((u.total() - 0.65).abs() < 1e-9);
        assert!((u.machine_busy - 0.75).abs() < 1e-9);
    }

    #[test]
    fn a_reused_pid_is_a_new_process_and_a_renamed_one_is_not() {
        let before = snap(&[(9, "old", 10, 500), (7, "kworker/u8:0-events", 3, 4000)], (0, 0));
        let after = snap(&[(9, "new", 80, 20), (7, "kworker/u8:0-writeback", 3, 4010)], (0, 0));
        let u = Usage::between(&before, &after, Duration::from_secs(1));
        assert!((u.named("new") - 0.20).abs() < 1e-9);
        // a kernel worker renames itself after its current work: still the same process
        assert!((u.named("kworker/u8:0-writeback") - 0.10).abs() < 1e-9);
        assert_eq!(u.machine_busy, 0.0);
    }

    #[test]
    fn this_process_is_readable_and_busiest_lists_by_name() {
        let me = std::process::id();
        let p = read_proc(me).expect("own /proc entry");
        assert!(!p.comm.is_empty());
        let u = Usage {
            procs: vec![
                ProcUse { pid: 1, comm: "kworker".into(), seconds: 0.3, title: String::new() },
                ProcUse { pid: 2, comm: "kworker".into(), seconds: 0.1, title: String::new() },
                ProcUse { pid: 3, comm: "quiet".into(), seconds: 0.01, title: String::new() },
            ],
            machine_busy: 0.5,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(u.busiest(|_| true), "kworker (40 % of a core)");
        assert_eq!(u.busiest(|p| p.comm == "quiet"), "none");
    }
}
