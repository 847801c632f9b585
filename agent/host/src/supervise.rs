//! The per-instance supervisor shim, `sluice supervise --spec FILE`.
//!
//! Each replica of a Process runs under its own shim, the leader of a new
//! process group, started detached by the host target. The shim, not the
//! agent, is the child's parent: so the child outlives the agent (one-shot
//! `sluice apply`, agent restarts and upgrades) and still gets restarted
//! with backoff when it crashes.
//!
//! # Guarantees
//! - The shim writes its state file (pid, start time, child pid, restarts)
//!   atomically before it starts the child, so a restarted agent can always
//!   find, verify and adopt it.
//! - On SIGTERM it stops restarting, lets the child (which got the same
//!   signal through the group) exit, and exits; the agent SIGKILLs the group
//!   after the grace period if anything is left.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::instance::{proc_start_time, write_json, InstanceState, LaunchSpec, RestartPolicy};

/// Body of `sluice supervise --spec PATH [--adopt]`. With `adopt`, the
/// child recorded in the state file still runs (its shim died): it is
/// watched, not started again.
pub fn run(spec_path: &Path, adopt: bool) -> ExitCode {
    let spec: LaunchSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice supervise: {}: {e}", spec_path.display());
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice supervise: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(supervise(spec, spec_path, adopt))
}

async fn supervise(spec: LaunchSpec, spec_path: &Path, adopt: bool) -> ExitCode {
    let state_path = spec_path.with_extension("state.json");
    let me = std::process::id();
    let mut state = InstanceState {
        shim_pid: me,
        shim_start: proc_start_time(me).unwrap_or(0),
        child_pid: None,
        child_start: None,
        restarts: 0,
        last_exit: None,
        phase: "starting".into(),
        child_group: None,
        spec: Some(Box::new(spec.clone())),
    };
    // The orphan to adopt: the child the dead shim recorded, if it still
    // is that process (pid and start time).
    let orphan = adopt
        .then(|| std::fs::read(&state_path).ok())
        .flatten()
        .and_then(|b| serde_json::from_slice::<InstanceState>(&b).ok())
        .filter(|old| {
            old.child_pid
                .zip(old.child_start)
                .is_some_and(|(p, t)| crate::instance::alive(p, t))
        });
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice supervise: signal: {e}");
            return ExitCode::from(1);
        }
    };
    // The last state written, for the keeper below.
    let written = std::rc::Rc::new(std::cell::RefCell::new(state.clone()));
    let save = |s: &InstanceState| {
        *written.borrow_mut() = s.clone();
        if let Err(e) = write_json(&state_path, s) {
            eprintln!("sluice supervise: writing {}: {e}", state_path.display());
        }
    };
    // Keeps both records readable: one damaged or removed by hand (or by
    // a full disk) is rewritten from memory within half a second, so the
    // agent never loses sight of a running replica.
    let keeper = {
        let (written, spec, spec_path, state_path) = (
            written.clone(),
            spec.clone(),
            spec_path.to_path_buf(),
            state_path.clone(),
        );
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let ok =
                    |p: &Path, check: fn(&[u8]) -> bool| std::fs::read(p).is_ok_and(|b| check(&b));
                if !ok(&spec_path, |b| {
                    serde_json::from_slice::<LaunchSpec>(b).is_ok()
                }) {
                    eprintln!(
                        "sluice supervise: {} was unreadable; rewritten",
                        spec_path.display()
                    );
                    let _ = write_json(&spec_path, &spec);
                }
                if !ok(&state_path, |b| {
                    serde_json::from_slice::<InstanceState>(b).is_ok()
                }) {
                    eprintln!(
                        "sluice supervise: {} was unreadable; rewritten",
                        state_path.display()
                    );
                    let _ = write_json(&state_path, &*written.borrow());
                }
            }
        }
    };
    let local = tokio::task::LocalSet::new();
    local.spawn_local(keeper);
    local.run_until(async move {
    if let Some(old) = orphan {
        let (pid, start) = (old.child_pid.unwrap_or(0), old.child_start.unwrap_or(0));
        let group = old.child_group.unwrap_or(old.shim_pid);
        state.child_pid = Some(pid);
        state.child_start = Some(start);
        state.child_group = Some(group);
        state.restarts = old.restarts;
        state.phase = "running".into();
        save(&state);
        eprintln!(
            "sluice supervise: {} adopted (pid {pid}) after its supervisor died",
            spec.key
        );
        // Not our child: watched through /proc.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !crate::instance::alive(pid, start) {
                        break;
                    }
                }
                _ = term.recv() => {
                    state.phase = "stopping".into();
                    save(&state);
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(group as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    let deadline = Instant::now() + Duration::from_millis(spec.stop_timeout_ms);
                    while Instant::now() < deadline && crate::instance::alive(pid, start) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    return ExitCode::SUCCESS;
                }
            }
        }
        eprintln!("sluice supervise: adopted {} exited", spec.key);
        state.last_exit = Some("exited while adopted (status unknown)".into());
        state.child_pid = None;
        state.child_start = None;
        state.child_group = None;
        if matches!(spec.restart.policy, RestartPolicy::Never) {
            state.phase = "exited".into();
            save(&state);
            let _ = term.recv().await;
            return ExitCode::SUCCESS;
        }
        state.restarts += 1;
    }
    save(&state);
    let mut backoff = spec.restart.initial_backoff_ms.max(10);
    loop {
        let mut cmd = tokio::process::Command::new(&spec.command);
        cmd.args(&spec.args)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(&spec.env)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sluice supervise: starting {}: {e}", spec.command.display());
                state.last_exit = Some(format!("failed to start: {e}"));
                state.phase = "backoff".into();
                state.restarts += 1;
                save(&state);
                if sleep_or_term(&mut term, backoff).await {
                    return ExitCode::SUCCESS;
                }
                backoff = (backoff * 2).min(spec.restart.max_backoff_ms);
                continue;
            }
        };
        state.child_pid = child.id();
        state.child_start = child.id().and_then(proc_start_time);
        state.phase = "running".into();
        save(&state);
        let status = tokio::select! {
            s = child.wait() => s,
            _ = term.recv() => {
                state.phase = "stopping".into();
                save(&state);
                // The child got SIGTERM through the process group.
                let _ = child.wait().await;
                return ExitCode::SUCCESS;
            }
        };
        let exit = match &status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        let success = status.as_ref().is_ok_and(|s| s.success());
        eprintln!("sluice supervise: {} exited: {exit}", spec.key);
        state.last_exit = Some(exit);
        state.child_pid = None;
        let restart = match spec.restart.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if !restart {
            state.phase = "exited".into();
            save(&state);
            // Stay as a marker of the exited instance until the agent stops it.
            let _ = term.recv().await;
            return ExitCode::SUCCESS;
        }
        // A child that ran a while was healthy: start the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = spec.restart.initial_backoff_ms.max(10);
        }
        state.restarts += 1;
        state.phase = "backoff".into();
        save(&state);
        if sleep_or_term(&mut term, backoff).await {
            return ExitCode::SUCCESS;
        }
        backoff = (backoff * 2).min(spec.restart.max_backoff_ms.max(10));
    }
    })
    .await
}

/// Sleeps `ms`; true when SIGTERM arrived meanwhile.
async fn sleep_or_term(term: &mut tokio::signal::unix::Signal, ms: u64) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
        _ = term.recv() => true,
    }
}
