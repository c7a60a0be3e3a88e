//! A real `redis-server` for tests, on a free port, with append-only
//! persistence (`appendfsync always`) in a temporary directory, so a test can
//! kill it and start it again with its data.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process. Dropping it kills the server.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra arguments (replication).
    extra: Vec<String>,
    /// Set for a Sentinel: its configuration file.
    sentinel_conf: Option<std::path::PathBuf>,
    /// Set for a server that speaks TLS only and wants a password.
    tls: Option<RedisTls>,
}

/// TLS material and a password for Redis servers and Sentinels: a CA of
/// its own and one server certificate for 127.0.0.1 and localhost, in a
/// temporary directory. Clones share the directory.
#[derive(Clone)]
pub struct RedisTls {
    dir: std::sync::Arc<tempfile::TempDir>,
    /// The data nodes' password (`requirepass`, `masterauth`).
    pub password: String,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTls({})", self.dir.path().display())
    }
}

impl RedisTls {
    /// Fresh material.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let td = mayfly_core::TrustDomain::new("redis.test").expect("trust domain");
        let ca = mayfly_broker::dev::DevCa::generate(&td).expect("a CA");
        let server = ca
            .issue_server(&["127.0.0.1", "localhost"], Duration::from_secs(3600))
            .expect("a server certificate");
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).expect("write");
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).expect("write");
        std::fs::write(dir.path().join("server.key"), server.key_pem.as_bytes()).expect("write");
        Self {
            dir: std::sync::Arc::new(dir),
            password: format!("pw-{}", free_port()),
        }
    }

    /// The CA's certificate (PEM file).
    pub fn ca_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `redis-server` arguments (or Sentinel configuration lines, with
    /// `--` and the space replaced) for TLS on `port` only.
    fn directives(&self, port: u16) -> Vec<(String, String)> {
        let p = |f: &str| self.dir.path().join(f).display().to_string();
        vec![
            ("port".into(), "0".into()),
            ("tls-port".into(), port.to_string()),
            ("tls-cert-file".into(), p("server.pem")),
            ("tls-key-file".into(), p("server.key")),
            ("tls-ca-cert-file".into(), p("ca.pem")),
            ("tls-auth-clients".into(), "no".into()),
            ("tls-replication".into(), "yes".into()),
        ]
    }
}

impl Default for RedisTls {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisServer(127.0.0.1:{})", self.port)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts a fresh server.
    pub fn start() -> Self {
        let mut dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                dir,
                child: None,
                extra: Vec::new(),
                sentinel_conf: None,
                tls: None,
            };
            if server.launch() {
                return server;
            }
            dir = server.into_dir();
        }
        panic!(
            "redis-server did not start (is Debian's redis-server installed? .ci/run installs it)"
        );
    }

    fn into_dir(mut self) -> tempfile::TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// Spawns redis-server on `self.port` and waits until it answers PING.
    fn launch(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        if let Some(conf) = &self.sentinel_conf {
            cmd.arg(conf).arg("--sentinel");
        }
        match &self.tls {
            // A Sentinel's TLS is in its configuration file.
            Some(tls) if self.sentinel_conf.is_none() => {
                for (k, v) in tls.directives(self.port) {
                    cmd.arg(format!("--{k}")).arg(v);
                }
                cmd.args([
                    "--requirepass",
                    &tls.password,
                    "--masterauth",
                    &tls.password,
                ]);
            }
            Some(_) => {}
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            panic!("cannot run redis-server: install Debian's redis-server (.ci/run does)");
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A server on a free port with a directory of its own, not started.
    fn unlaunched(tls: Option<RedisTls>) -> Self {
        Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            extra: Vec::new(),
            sentinel_conf: None,
            tls,
        }
    }

    /// Starts a server replicating from `primary`.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let mut server = Self::unlaunched(None);
        server.extra = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ];
        assert!(server.launch(), "redis replica did not start");
        server
    }

    /// Starts a server that speaks only TLS (`tls`'s certificate) and
    /// wants `tls.password`.
    pub fn start_tls(tls: &RedisTls) -> Self {
        let mut server = Self::unlaunched(Some(tls.clone()));
        assert!(server.launch(), "redis-server with TLS did not start");
        server
    }

    /// Starts a Sentinel that speaks only TLS, monitoring the TLS `primary`
    /// as `name` with its password (quorum 1, failure detection after 1 s).
    pub fn start_sentinel_tls(primary: &RedisServer, name: &str, tls: &RedisTls) -> Self {
        let mut server = Self::unlaunched(Some(tls.clone()));
        let conf = server.dir.path().join("sentinel.conf");
        let mut text: String = tls
            .directives(server.port)
            .into_iter()
            .map(|(k, v)| format!("{k} {v}\n"))
            .collect();
        text.push_str(&format!(
            "bind 127.0.0.1\nsentinel monitor {name} 127.0.0.1 {p} 1\n\
             sentinel auth-pass {name} {pw}\n\
             sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n",
            p = primary.port,
            pw = tls.password,
        ));
        std::fs::write(&conf, text).expect("sentinel config");
        server.sentinel_conf = Some(conf);
        assert!(server.launch(), "redis sentinel with TLS did not start");
        server
    }

    /// Starts a Sentinel monitoring `primary` as `name` (quorum 1, failure
    /// detection after 1 s).
    pub fn start_sentinel(primary: &RedisServer, name: &str) -> Self {
        let mut server = Self::unlaunched(None);
        let conf = server.dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor {name} 127.0.0.1 {p} 1\n\
                 sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n",
                port = server.port,
                p = primary.port,
            ),
        )
        .expect("sentinel config");
        server.sentinel_conf = Some(conf);
        assert!(server.launch(), "redis sentinel did not start");
        server
    }

    /// Whether the server answers PING now.
    pub fn ping(&self) -> bool {
        if let Some(tls) = &self.tls {
            let mut cmd = Command::new("redis-cli");
            cmd.args(["--tls", "--cacert"]).arg(tls.ca_path()).args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ]);
            if self.sentinel_conf.is_none() {
                cmd.env("REDISCLI_AUTH", &tls.password);
            }
            return cmd
                .arg("PING")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG");
        }
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL): acknowledged writes are on disk
    /// (`appendfsync always`), anything else is lost, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.launch(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Runs one command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
