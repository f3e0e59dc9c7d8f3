//! Reading rules from a file or a directory, and reloading them on change.
//!
//! A directory is read like Envoy's ratelimit reads its config directory,
//! and like Kubernetes mounts a ConfigMap: every `*.yaml`/`*.yml` file in it
//! and its subdirectories, symlinks followed, hidden entries (the `..data`
//! and `..<timestamp>` links of a ConfigMap mount) skipped.
//!
//! Reload polls: every period the files are read again and compared with
//! what was loaded. Polling sees every way a file can change — in-place
//! writes, atomic renames over it, a ConfigMap's symlink swap, NFS — where
//! inotify needs a different trick for each; at one small read per period it
//! costs nothing. A bad change keeps the old rules, is logged once with the
//! reason and counted in `mesh_ratelimit_rule_reloads_total{result="error"}`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use super::{Rules, parse::RulesError, parse_documents};

/// The rules in force, swapped whole on reload.
#[derive(Debug, Clone)]
pub(crate) struct RulesHandle(Arc<RwLock<Arc<Rules>>>);

impl RulesHandle {
    pub(crate) fn new(rules: Rules) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(rules))))
    }

    pub(crate) fn get(&self) -> Arc<Rules> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, rules: Rules) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }
}

/// The files behind a rules path and their contents.
type Snapshot = Vec<(PathBuf, String)>;

const MAX_DEPTH: usize = 8;

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), RulesError> {
    let read = |e: std::io::Error| RulesError(format!("{}: cannot read directory: {e}", dir.display()));
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read)?;
    entries.sort();
    for path in entries {
        if is_hidden(&path) {
            continue;
        }
        // `metadata` follows symlinks; a dangling link is skipped (a
        // ConfigMap update removes the old target before relinking).
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                collect(&path, depth + 1, out)?;
            }
        } else if meta.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

fn snapshot(path: &Path) -> Result<Snapshot, RulesError> {
    let meta = std::fs::metadata(path).map_err(|e| RulesError(format!("{}: {e}", path.display())))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        collect(path, 0, &mut files)?;
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| RulesError(format!("{}: cannot read: {e}", f.display())))?;
            Ok((f, text))
        })
        .collect()
}

fn parse_snapshot(snap: &Snapshot) -> Result<Rules, RulesError> {
    let mut seen = HashMap::new();
    let mut domains = HashMap::new();
    for (path, text) in snap {
        for d in parse_documents(&path.display().to_string(), text, &mut seen)? {
            domains.insert(d.name.clone(), d);
        }
    }
    Ok(Rules { domains, loaded_at: SystemTime::now() })
}

/// Loads the rules at `path` (a file or a directory).
pub(crate) fn load_path(path: &Path) -> Result<Rules, RulesError> {
    parse_snapshot(&snapshot(path)?)
}

/// What a reload did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reload {
    Loaded,
    Failed,
}

/// Polls `path` every `period` and swaps in new rules when its files change.
/// `on_reload` runs after every attempt (metrics, clearing caches).
pub(crate) fn watch(
    handle: RulesHandle,
    path: PathBuf,
    period: Duration,
    on_reload: impl Fn(Reload, &Rules) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = snapshot(&path).ok();
        let mut last_error: Option<RulesError> = None;
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let p = path.clone();
            let Ok(current) = tokio::task::spawn_blocking(move || snapshot(&p)).await else { continue };
            let result = current.and_then(|snap| {
                if last.as_ref() == Some(&snap) {
                    return Ok(None);
                }
                let rules = parse_snapshot(&snap)?;
                last = Some(snap);
                Ok(Some(rules))
            });
            match result {
                Ok(None) => last_error = None,
                Ok(Some(rules)) => {
                    let mut names: Vec<&String> = rules.domains.keys().collect();
                    names.sort();
                    tracing::info!(path = %path.display(), domains = ?names, "rules reloaded");
                    last_error = None;
                    handle.set(rules.clone());
                    on_reload(Reload::Loaded, &rules);
                }
                Err(e) => {
                    // Log and count each distinct failure once, not every period.
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(path = %path.display(), error = %e, "rules not reloaded, keeping the previous rules");
                        on_reload(Reload::Failed, &handle.get());
                        last_error = Some(e);
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_skip_hidden_entries_and_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2025_01_01");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("api.yaml"), "domain: api\n").unwrap();
        std::fs::write(data.join("more.yml"), "domain: b\n---\ndomain: c\n").unwrap();
        std::os::unix::fs::symlink("..2025_01_01", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/api.yaml", dir.path().join("api.yaml")).unwrap();
        std::os::unix::fs::symlink("..data/more.yml", dir.path().join("more.yml")).unwrap();
        std::fs::write(dir.path().join("README.md"), "not rules").unwrap();
        std::fs::write(dir.path().join(".hidden.yaml"), "domain: hidden\n").unwrap();
        let rules = load_path(dir.path()).unwrap();
        let mut names: Vec<&String> = rules.domains.keys().collect();
        names.sort();
        assert_eq!(names, ["api", "b", "c"]);
    }

    #[test]
    fn a_domain_in_two_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "domain: api\n").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "domain: api\n").unwrap();
        let e = load_path(dir.path()).unwrap_err();
        assert!(e.0.contains("already defined"), "{e}");
    }

    #[test]
    fn a_missing_path_says_so() {
        let e = load_path(Path::new("/nonexistent/rules.yaml")).unwrap_err();
        assert!(e.0.contains("/nonexistent/rules.yaml"), "{e}");
    }
}
