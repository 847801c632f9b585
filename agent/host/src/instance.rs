//! Process instances: launching a detached supervisor shim per replica,
//! finding them again after an agent restart, and stopping them.
//!
//! # Guarantees
//! - Adoption is pid-reuse safe: an instance is alive only if its recorded
//!   shim pid exists, is not a zombie, and has the recorded start time.
//! - Stopping is graceful and whole: SIGTERM to the process group, a grace
//!   period, then SIGKILL to the group; then the records go. Idempotent.
//!
//! # Caveats
//! Linux only (reads /proc).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything the shim needs to run one replica. Written by the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub key: String,
    /// Name of the Process resource.
    pub resource: String,
    pub version: String,
    pub replica: u32,
    pub port: u16,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub restart: Restart,
    pub stop_timeout_ms: u64,
    /// The desired body this instance runs (what observe reports).
    pub body: Value,
    /// Digest of `body`: instances of one resource with another digest are
    /// from another release.
    pub digest: String,
    /// How readiness is checked.
    pub readiness: Probe,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Restart {
    pub policy: RestartPolicy,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    Http(String),
    Tcp,
    /// No check: ready while the process is up.
    Alive,
}

/// Written by the shim.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InstanceState {
    pub shim_pid: u32,
    /// Clock ticks since boot (/proc/<pid>/stat field 22).
    pub shim_start: u64,
    pub child_pid: Option<u32>,
    pub child_start: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// starting | running | backoff | exited | stopping
    pub phase: String,
    /// The child's process group when it is not the shim's own: a child
    /// adopted by a new shim after its first one died stays in the group
    /// it was started in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_group: Option<u32>,
    /// A copy of the instance's spec, so either record can rebuild the
    /// other (see [`Supervisor::list`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Box<LaunchSpec>>,
}

/// An instance found on disk, with its liveness checked.
#[derive(Clone, Debug)]
pub struct Instance {
    pub spec: LaunchSpec,
    pub state: Option<InstanceState>,
    pub alive: bool,
}

impl Instance {
    pub fn child_running(&self) -> bool {
        self.state.as_ref().is_some_and(|s| {
            s.phase == "running"
                && s.child_pid
                    .zip(s.child_start)
                    .is_some_and(|(p, t)| alive(p, t))
        })
    }
}

/// The instances of one host target, under `<state_dir>/instances`.
#[derive(Clone, Debug)]
pub struct Supervisor {
    dir: PathBuf,
    logs: PathBuf,
    exe: PathBuf,
}

impl Supervisor {
    pub fn new(state_dir: &Path, exe: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("instances");
        let logs = state_dir.join("logs");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&logs)?;
        Ok(Supervisor {
            dir,
            logs,
            exe: exe.to_path_buf(),
        })
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.logs.join(format!("{key}.log"))
    }

    /// Every instance on record, alive or not.
    ///
    /// A record that cannot be read is never skipped in silence (that would
    /// hide a running replica: a duplicate started beside it, its routes
    /// dropped). The agent's spec and the supervisor's state each carry
    /// what the other needs: an unreadable spec is taken from the state's
    /// copy, an unreadable state from the running supervisor (found by its
    /// command line), and the supervisor rewrites both within half a
    /// second. Each damaged record is logged.
    pub fn list(&self) -> Vec<Instance> {
        let (out, waiting) = self.scan();
        if !waiting {
            return out;
        }
        // A live supervisor will have rewritten its records by then.
        std::thread::sleep(Duration::from_millis(600));
        self.scan().0
    }

    /// The instances on record, and whether a damaged record's supervisor
    /// runs (so it is about to be rewritten).
    fn scan(&self) -> (Vec<Instance>, bool) {
        let mut out = Vec::new();
        let mut waiting = false;
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (out, waiting);
        };
        let mut keys = std::collections::BTreeSet::new();
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(key) = name
                .strip_suffix(".state.json")
                .or_else(|| name.strip_suffix(".json"))
            {
                keys.insert(key.to_string());
            }
        }
        for key in keys {
            let spec_path = self.dir.join(format!("{key}.json"));
            let state_path = self.dir.join(format!("{key}.state.json"));
            let read_spec = read_record::<LaunchSpec>(&spec_path);
            let read_state = read_record::<InstanceState>(&state_path);
            let state = match read_state {
                Ok(s) => s,
                Err(why) => {
                    tracing::error!(record = %state_path.display(), reason = %why, "instance record unreadable");
                    None
                }
            };
            let spec = match read_spec {
                Ok(Some(spec)) => spec,
                Ok(None) | Err(_) => {
                    if let Err(why) = &read_spec {
                        tracing::error!(record = %spec_path.display(), reason = %why, "instance record unreadable");
                    }
                    match state.as_ref().and_then(|s| s.spec.clone()) {
                        Some(copy) => {
                            tracing::warn!(record = %spec_path.display(), "instance spec restored from its supervisor's copy");
                            let _ = write_json(&spec_path, &*copy);
                            *copy
                        }
                        None => {
                            if read_spec.is_err() && find_supervisor(&spec_path).is_some() {
                                waiting = true;
                            }
                            continue;
                        }
                    }
                }
            };
            let (state, alive) = match state {
                Some(s) => {
                    let a = alive(s.shim_pid, s.shim_start);
                    (Some(s), a)
                }
                None => match find_supervisor(&spec_path) {
                    // Its supervisor runs: it rewrites the state shortly.
                    Some(_) => {
                        waiting = true;
                        (None, true)
                    }
                    None => (None, false),
                },
            };
            out.push(Instance { spec, state, alive });
        }
        out.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
        (out, waiting)
    }

    /// Starts the shim for `spec`, detached, and waits (briefly) for it to
    /// record itself. Idempotent: an alive instance with this key is kept.
    pub async fn start(&self, spec: &LaunchSpec) -> Result<(), String> {
        if let Some(i) = self.list().into_iter().find(|i| i.spec.key == spec.key) {
            if i.alive {
                return Ok(());
            }
            self.stop(&i).await;
        }
        let spec_path = self.dir.join(format!("{}.json", spec.key));
        let _ = std::fs::remove_file(spec_path.with_extension("state.json"));
        write_json(&spec_path, spec)
            .map_err(|e| format!("writing {}: {e}", spec_path.display()))?;
        self.spawn_shim(spec, &spec_path, false).await
    }

    /// A new shim for an instance whose shim died while its process runs
    /// on: it takes the running process over (no second copy), watches
    /// it, and restarts it by its policy once it exits.
    pub async fn adopt(&self, i: &Instance) -> Result<(), String> {
        if i.alive || !i.child_running() {
            return Ok(());
        }
        let spec_path = self.dir.join(format!("{}.json", i.spec.key));
        self.spawn_shim(&i.spec, &spec_path, true).await
    }

    async fn spawn_shim(
        &self,
        spec: &LaunchSpec,
        spec_path: &Path,
        adopt: bool,
    ) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&spec.key))
            .map_err(|e| format!("opening the log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        // A new process group, no terminal, output to the log; the child
        // handle is dropped (tokio reaps it if it exits while we run).
        // The supervisor needs nothing of the agent's environment: the
        // service's own is in the spec.
        let child = tokio::process::Command::new(&self.exe)
            .arg("supervise")
            .arg("--spec")
            .arg(spec_path)
            .args(adopt.then_some("--adopt"))
            .env_clear()
            .envs(crate::inherited_env())
            .process_group(0)
            .current_dir(&spec.cwd)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("starting the supervisor ({}): {e}", self.exe.display()))?;
        drop(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(i) = self.list().into_iter().find(|i| i.spec.key == spec.key) {
                if i.alive && i.state.as_ref().is_some_and(|s| s.phase != "starting") {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Nothing half-started stays behind: a supervisor that could not
        // record itself (a full disk, a broken binary) is stopped with
        // whatever it started.
        if let Some(i) = self.list().into_iter().find(|i| i.spec.key == spec.key) {
            self.stop(&i).await;
        } else if let Some(pid) = find_supervisor(spec_path) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = std::fs::remove_file(spec_path.with_extension("state.json"));
            let _ = std::fs::remove_file(spec_path);
        }
        Err(format!(
            "the supervisor of {} did not start within 5s{} (see {})",
            spec.key,
            disk_full(&self.dir)
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
            self.log_path(&spec.key).display()
        ))
    }

    /// SIGTERM to the group, wait up to the stop timeout, SIGKILL the group,
    /// remove the records. Idempotent.
    pub async fn stop(&self, i: &Instance) {
        if let Some(s) = &i.state {
            let group = Pid::from_raw(s.shim_pid as i32);
            let child_alive = || {
                s.child_pid
                    .zip(s.child_start)
                    .is_some_and(|(p, t)| alive(p, t))
            };
            let child_group = s.child_group.map(|g| Pid::from_raw(g as i32));
            if i.alive || child_alive() {
                let _ = killpg(group, Signal::SIGTERM);
                if let Some(g) = child_group {
                    let _ = killpg(g, Signal::SIGTERM);
                }
                let deadline = Instant::now() + Duration::from_millis(i.spec.stop_timeout_ms);
                while Instant::now() < deadline
                    && (alive(s.shim_pid, s.shim_start) || child_alive())
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = killpg(group, Signal::SIGKILL);
                if let Some(g) = child_group {
                    let _ = killpg(g, Signal::SIGKILL);
                }
                let deadline = Instant::now() + Duration::from_secs(2);
                while Instant::now() < deadline
                    && (alive(s.shim_pid, s.shim_start) || child_alive())
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let spec_path = self.dir.join(format!("{}.json", i.spec.key));
        let _ = std::fs::remove_file(spec_path.with_extension("state.json"));
        let _ = std::fs::remove_file(&spec_path);
    }
}

/// "No space left on device on <dir>" when the file system holding
/// `dir` has no room left (the likeliest reason records cannot be written).
pub fn disk_full(dir: &Path) -> Option<String> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    (free < 64 * 1024).then(|| {
        format!(
            "No space left on device on the file system of {} ({free} bytes free)",
            dir.display()
        )
    })
}

/// A record: None if there is none, an error if it cannot be read.
fn read_record<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The pid of the running `sluice supervise --spec <spec_path>`, found by
/// its command line.
pub fn find_supervisor(spec_path: &Path) -> Option<u32> {
    let want = spec_path.as_os_str().as_encoded_bytes();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let supervising = args.iter().any(|a| *a == b"supervise")
            && args.windows(2).any(|w| w[0] == b"--spec" && w[1] == want);
        if supervising && proc_start_time(pid).is_some_and(|t| alive(pid, t)) {
            return Some(pid);
        }
    }
    None
}

/// Whether `pid` runs, is not a zombie, and started at `start` ticks.
pub fn alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 is fields[19].
    fields.first().is_some_and(|s| *s != "Z" && *s != "X")
        && fields.get(19).and_then(|f| f.parse::<u64>().ok()) == Some(start)
}

/// Start time of `pid` in clock ticks since boot.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Writes JSON atomically (see [`sluice_core::store::write_file_atomic`]).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    sluice_core::store::write_file_atomic(path, &bytes, None)
}
