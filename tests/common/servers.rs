//! Real git servers on 127.0.0.1, started by the tests that use them:
//! OpenSSH's sshd with its own config, host key and authorized keys, and
//! nginx in front of `git http-backend` (through fcgiwrap) with TLS from a
//! certificate authority made here and basic auth. `tests/run` installs
//! them (Debian's openssh-server, nginx-light, fcgiwrap).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// The crate that includes this file provides `ports` (tests/common/ports.rs).
use crate::ports::free_port;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// sshd on a free port of 127.0.0.1, accepting the keys it made for root.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// `ssh-ed25519 AAAA…` of the server.
    pub host_key: String,
    /// A key without a passphrase, and one encrypted with [`PASSPHRASE`].
    pub key: PathBuf,
    pub encrypted_key: PathBuf,
}

pub const PASSPHRASE: &str = "correct horse battery staple";

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        let keygen = |path: &Path, passphrase: &str| {
            run(Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    passphrase,
                    "-C",
                    "sluice-test",
                    "-f",
                ])
                .arg(path));
        };
        let host = dir.join("host_key");
        let key = dir.join("id_ed25519");
        let encrypted_key = dir.join("id_encrypted");
        keygen(&host, "");
        keygen(&key, "");
        keygen(&encrypted_key, PASSPHRASE);
        let pubs: Vec<String> = [&key, &encrypted_key]
            .iter()
            .map(|k| std::fs::read_to_string(k.with_extension("pub")).unwrap())
            .collect();
        std::fs::write(dir.join("authorized_keys"), pubs.concat()).unwrap();
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\nAuthorizedKeysFile {keys}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n",
                host = host.display(),
                pid = dir.join("sshd.pid").display(),
                keys = dir.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        // Privilege separation wants this folder.
        let _ = std::fs::create_dir_all("/run/sshd");
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sshd (apt-get install openssh-server)");
        wait_for_port(port, "sshd", &log);
        let host_key = std::fs::read_to_string(host.with_extension("pub"))
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        Sshd {
            child,
            port,
            dir: dir.to_path_buf(),
            host_key,
            key,
            encrypted_key,
        }
    }

    /// A known_hosts line for this server (or for `key` in its place).
    pub fn known_hosts_line(&self, key: Option<&str>) -> String {
        format!(
            "[127.0.0.1]:{} {}\n",
            self.port,
            key.unwrap_or(&self.host_key)
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// nginx with TLS (a CA made here) and basic auth in front of `git
/// http-backend` serving the repositories below `root`, plus a second
/// server on another port that a path of the first redirects to, with its
/// own log of the Authorization header each request carried.
pub struct GitHttp {
    nginx: Child,
    fcgi: Child,
    pub port: u16,
    pub other_port: u16,
    pub dir: PathBuf,
    /// The CA certificate (PEM) the server's certificate is signed by.
    pub ca: PathBuf,
}

impl GitHttp {
    pub fn start(dir: &Path, root: &Path, user: &str, password: &str) -> GitHttp {
        Self::start_with(
            dir,
            root,
            user,
            password,
            "$request_uri $status $bytes_sent \"$http_authorization\"",
        )
    }

    /// [`GitHttp::start`] with nginx's `log_format` of choice.
    pub fn start_with(
        dir: &Path,
        root: &Path,
        user: &str,
        password: &str,
        log_format: &str,
    ) -> GitHttp {
        std::fs::create_dir_all(dir).unwrap();
        let d = |f: &str| dir.join(f);
        let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3",
            "-subj",
            "/CN=sluice test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(d("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "3",
            "-extfile",
            "san.ext",
        ]);
        let hash = openssl(&["passwd", "-apr1", password]);
        std::fs::write(d("htpasswd"), format!("{user}:{}\n", hash.trim())).unwrap();
        let socket = d("fcgi.sock");
        let fcgi = Command::new("/usr/sbin/fcgiwrap")
            .arg("-s")
            .arg(format!("unix:{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d("fcgi.log")).unwrap())
            .spawn()
            .expect("fcgiwrap (apt-get install fcgiwrap)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "fcgiwrap made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let backend = Command::new("git")
            .arg("--exec-path")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap();
        let port = free_port();
        let other_port = free_port();
        let git = format!(
            "auth_basic \"git\";\n      auth_basic_user_file {htpasswd};\n      fastcgi_pass unix:{socket};\n      include /etc/nginx/fastcgi_params;\n      fastcgi_param SCRIPT_FILENAME {backend}/git-http-backend;\n      fastcgi_param GIT_PROJECT_ROOT {root};\n      fastcgi_param GIT_HTTP_EXPORT_ALL \"\";\n      fastcgi_param PATH_INFO $uri;\n      fastcgi_param REMOTE_USER $remote_user;\n      fastcgi_param GIT_PROTOCOL $http_git_protocol;\n      fastcgi_read_timeout 60s;",
            htpasswd = d("htpasswd").display(),
            socket = socket.display(),
            root = root.display(),
        );
        let tls = format!(
            "ssl_certificate {};\n    ssl_certificate_key {};",
            d("server.pem").display(),
            d("server.key").display()
        );
        let conf = format!(
            "worker_processes 1;\nuser root;\npid {pid};\nerror_log {err};\nevents {{}}\nhttp {{\n  log_format git '{log_format}';\n  client_body_temp_path {tmp}/body;\n  fastcgi_temp_path {tmp}/fastcgi;\n  proxy_temp_path {tmp}/proxy;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    {tls}\n    access_log {access} git;\n    location /moved/ {{\n      rewrite ^/moved/(.*)$ https://127.0.0.1:{other_port}/$1 redirect;\n    }}\n    location / {{\n      {git}\n    }}\n  }}\n  server {{\n    listen 127.0.0.1:{other_port} ssl;\n    {tls}\n    access_log {other} git;\n    location / {{\n      {git}\n    }}\n  }}\n}}\n",
            pid = d("nginx.pid").display(),
            err = d("error.log").display(),
            tmp = dir.display(),
            access = d("access.log").display(),
            other = d("other.log").display(),
        );
        std::fs::write(d("nginx.conf"), conf).unwrap();
        let nginx = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(d("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d("nginx.out")).unwrap())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        wait_for_port(port, "nginx", &d("error.log"));
        GitHttp {
            nginx,
            fcgi,
            port,
            other_port,
            dir: dir.to_path_buf(),
            ca: d("ca.pem"),
        }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("https://127.0.0.1:{}/{repo}", self.port)
    }

    /// The access log of the main server, or of the redirect target.
    pub fn log(&self, other: bool) -> Vec<String> {
        let f = self
            .dir
            .join(if other { "other.log" } else { "access.log" });
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for GitHttp {
    fn drop(&mut self) {
        kill(&mut self.nginx);
        kill(&mut self.fcgi);
    }
}

/// A bare copy of `repo` below `root` as `name`, as a server serves it.
pub fn serve(repo: &Path, root: &Path, name: &str) -> PathBuf {
    let bare = root.join(name);
    run(Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(repo)
        .arg(&bare));
    run(Command::new("git")
        .arg("-C")
        .arg(&bare)
        .args(["config", "http.receivepack", "true"]));
    bare
}
