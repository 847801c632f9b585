//! Ports for the servers tests start.

/// A port on 127.0.0.1 that is free and stays this test run's: taken
/// from 30000-32767, between the host target's process ports
/// (20000-29999) and the kernel's ephemeral range (32768 and up), so no
/// outgoing connection or `bind(0)` of another process can take it
/// between now and the moment the test's server binds it; a reservation
/// file (created exclusively) keeps concurrent test processes apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join("sluice-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..2768 {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 30000 + (seed.wrapping_add(i.wrapping_mul(13)) % 2768) as u16;
        let stamp = dir.join(port.to_string());
        // A reservation older than an hour belongs to a finished run.
        let stale = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600));
        if stale {
            let _ = std::fs::remove_file(&stamp);
        }
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&stamp)
            .is_err()
        {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 30000-32767")
}
