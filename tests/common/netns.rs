//! Hosts on one machine: each its own network namespace, with its own
//! address on a veth pair and its own sshd (Debian's openssh-server,
//! started here with its own config and host key). Cutting a host off is
//! `ip link set <veth> down` on the machine's side. Needs root.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Hosts made by this test process so far (names and subnets are unique).
static MADE: AtomicU32 = AtomicU32::new(0);

pub struct Host {
    /// The network namespace.
    pub ns: String,
    /// The machine's end of the veth pair.
    pub veth: String,
    /// The host's address (sshd listens on port 22 there).
    pub addr: String,
    /// `$SLUICE_HOME` of sessions on this host (sshd's SetEnv).
    pub home: PathBuf,
    sshd: Child,
}

pub struct Hosts {
    pub dir: tempfile::TempDir,
    pub hosts: Vec<Host>,
    /// The client's private key (authorized on every host).
    pub key: PathBuf,
    /// Every host's key, as ssh's known_hosts.
    pub known_hosts: PathBuf,
    /// An empty ssh config (root's own stays out of the tests).
    pub ssh_config: PathBuf,
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            path.to_str().unwrap(),
        ],
    );
}

impl Hosts {
    /// `n` hosts, sshd up on each.
    pub fn new(n: usize) -> Hosts {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the fleet tests make network namespaces: run them as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let key = dir.path().join("client");
        keygen(&key);
        std::fs::copy(
            key.with_extension("pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        let ssh_config = dir.path().join("ssh_config");
        std::fs::write(&ssh_config, "").unwrap();
        let mut known = String::new();
        let pid = std::process::id();
        let mut hosts = Vec::new();
        for _ in 0..n {
            let k = MADE.fetch_add(1, Ordering::Relaxed);
            assert!(k < 250, "too many test hosts in one process");
            let ns = format!("sluice-{pid}-{k}");
            let veth = format!("sv{}h{k}", pid % 100_000);
            let peer = format!("sp{}h{k}", pid % 100_000);
            let net = format!("10.{}.{k}", 64 + pid % 128);
            let addr = format!("{net}.2");
            run("ip", &["netns", "add", &ns]);
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            );
            run("ip", &["link", "set", &peer, "netns", &ns]);
            run("ip", &["addr", "add", &format!("{net}.1/24"), "dev", &veth]);
            run("ip", &["link", "set", &veth, "up"]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &ns, "ip"];
                all.extend(args);
                run("ip", &all);
            };
            inside(&["link", "set", "lo", "up"]);
            inside(&["addr", "add", &format!("{addr}/24"), "dev", &peer]);
            inside(&["link", "set", &peer, "up"]);
            let i = hosts.len();
            let host_key = dir.path().join(format!("host{i}_ed25519"));
            keygen(&host_key);
            let pubkey = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
            let mut parts = pubkey.split_whitespace();
            known.push_str(&format!(
                "{addr} {} {}\n",
                parts.next().unwrap(),
                parts.next().unwrap()
            ));
            let home = dir.path().join(format!("host{i}"));
            std::fs::create_dir_all(&home).unwrap();
            let config = dir.path().join(format!("sshd{i}_config"));
            std::fs::write(
                &config,
                format!(
                    "Port 22\nListenAddress {addr}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nMaxSessions 64\nMaxStartups 64:30:128\nSetEnv SLUICE_HOME={}\n",
                    host_key.display(),
                    dir.path().join("authorized_keys").display(),
                    dir.path().join(format!("sshd{i}.pid")).display(),
                    home.display(),
                ),
            )
            .unwrap();
            let sshd = Command::new("ip")
                .args(["netns", "exec", &ns, "/usr/sbin/sshd", "-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("sshd{i}.log"))).unwrap())
                .spawn()
                .expect("sshd");
            hosts.push(Host {
                ns,
                veth,
                addr,
                home,
                sshd,
            });
        }
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, known).unwrap();
        let all = Hosts {
            dir,
            hosts,
            key,
            known_hosts,
            ssh_config,
        };
        for h in &all.hosts {
            let deadline = Instant::now() + Duration::from_secs(10);
            while TcpStream::connect_timeout(
                &format!("{}:22", h.addr).parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_err()
            {
                assert!(
                    Instant::now() < deadline,
                    "sshd on {} did not come up: {}",
                    h.addr,
                    all.sshd_log(h)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        all
    }

    pub fn sshd_log(&self, h: &Host) -> String {
        let i = self.hosts.iter().position(|x| x.ns == h.ns).unwrap_or(0);
        std::fs::read_to_string(self.dir.path().join(format!("sshd{i}.log"))).unwrap_or_default()
    }

    /// The agent's flags that reach these hosts.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--fleet-ssh-config".into(),
            self.ssh_config.display().to_string(),
            "--fleet-ssh-key".into(),
            self.key.display().to_string(),
            "--fleet-known-hosts".into(),
            self.known_hosts.display().to_string(),
        ]
    }

    /// Cuts host `i` off the network (its processes keep running).
    pub fn cut(&self, i: usize) {
        run("ip", &["link", "set", &self.hosts[i].veth, "down"]);
    }

    pub fn restore(&self, i: usize) {
        run("ip", &["link", "set", &self.hosts[i].veth, "up"]);
    }

    /// A reboot, as far as sluice can tell: every process of the host but
    /// its sshd is killed.
    pub fn reboot(&self, i: usize) {
        let h = &self.hosts[i];
        for pid in ns_pids(&h.ns) {
            if pid != h.sshd.id() && !is_sshd(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// An HTTP GET from inside host `i` (to 127.0.0.1 there): status and
    /// body.
    pub fn get(&self, i: usize, port: u16, path: &str) -> Result<(u16, String), String> {
        let ns = self.hosts[i].ns.clone();
        let path = path.to_string();
        std::thread::spawn(move || -> Result<(u16, String), String> {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| e.to_string())?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            let mut s = TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse().unwrap(),
                Duration::from_secs(2),
            )
            .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3))).ok();
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut text = String::new();
            s.read_to_string(&mut text).map_err(|e| e.to_string())?;
            let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or("no status")?;
            Ok((code, body.to_string()))
        })
        .join()
        .map_err(|_| "the probe thread panicked".to_string())?
    }

    /// The version a demo service on host `i` answers with, if it answers.
    pub fn version(&self, i: usize, port: u16) -> Option<String> {
        let (code, body) = self.get(i, port, "/").ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["version"].as_str().map(str::to_string)
    }

    /// Pids of the demo services running on host `i`, by service name.
    pub fn service_pids(&self, i: usize) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for pid in ns_pids(&self.hosts[i].ns) {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).to_string())
                .collect();
            if !args.iter().any(|a| a == "demo") {
                continue;
            }
            if let Some(n) = args.iter().position(|a| a == "--name") {
                out.push((args.get(n + 1).cloned().unwrap_or_default(), pid));
            }
        }
        out.sort();
        out
    }
}

fn ns_pids(ns: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn is_sshd(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sshd")
}

impl Drop for Hosts {
    /// Everything the hosts ran goes with them, even when a test failed.
    fn drop(&mut self) {
        for h in &mut self.hosts {
            for pid in ns_pids(&h.ns) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = h.sshd.kill();
            let _ = h.sshd.wait();
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
            let _ = Command::new("ip")
                .args(["link", "del", &h.veth])
                .stderr(Stdio::null())
                .status();
        }
    }
}
