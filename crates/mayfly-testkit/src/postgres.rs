//! A real PostgreSQL for tests: `initdb` and `pg_ctl` on a free port in a
//! temporary directory, with password (SCRAM) authentication over TCP, so
//! a login that should be refused is refused by the server's own check.
//! PostgreSQL will not run as root: a root test runs the server as the
//! `postgres` user Debian's package creates (`.ci/run` installs it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The password of `mayfly_manager` in [`PgServer::orders`].
pub const ORDERS_MANAGER_PASSWORD: &str = "orders-manager-secret";

/// A PostgreSQL server. Dropping it stops the server.
pub struct PgServer {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The superuser's (`postgres`) password.
    password: String,
    running: bool,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgServer(127.0.0.1:{})", self.port)
    }
}

/// Where the server binaries are: `initdb` on the PATH, else the newest
/// Debian install.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    }) {
        return dir;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "PostgreSQL's initdb is not installed (Debian's postgresql package; .ci/run installs it)",
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether this process is root, which PostgreSQL refuses to run as.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program` with `args`, as the `postgres` user when this process is root.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl PgServer {
    /// Initialises a cluster and starts it.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        let password = format!("pw{}", free_port());
        if is_root() {
            // The server user must own its directory.
            let chown = |p: &Path| {
                run(
                    {
                        let mut c = Command::new("chown");
                        c.arg("-R").arg("postgres:postgres").arg(p);
                        c
                    },
                    "chown",
                )
            };
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            chown(dir.path());
        }
        let pwfile = dir.path().join("superuser.pw");
        std::fs::write(&pwfile, &password).expect("password file");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&pwfile);
                    c
                },
                "chown",
            );
        }
        let mut init = as_server_user(&bin.join("initdb"));
        init.arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(init, "initdb");
        let mut server = Self {
            port: 0,
            dir,
            bin,
            password,
            running: false,
        };
        server.start_again();
        server
    }

    /// A server with the `orders` database the database-login tests and
    /// benches share: a table `orders (id int, amount int)` holding
    /// `(1, 50)`; roles `orders_reader` (SELECT on it), `orders_writer`
    /// (SELECT, INSERT) and `orders_owner` (nothing); and
    /// `mayfly_manager`, a role manager that is no superuser (`LOGIN
    /// CREATEROLE`, password [`ORDERS_MANAGER_PASSWORD`]).
    pub fn orders() -> Self {
        let pg = Self::start();
        pg.psql("postgres", "CREATE DATABASE orders")
            .expect("CREATE DATABASE");
        pg.psql(
            "orders",
            &format!(
                "CREATE TABLE orders (id int, amount int);
                 INSERT INTO orders VALUES (1, 50);
                 CREATE ROLE orders_reader NOLOGIN;
                 GRANT SELECT ON orders TO orders_reader;
                 CREATE ROLE orders_writer NOLOGIN;
                 GRANT SELECT, INSERT ON orders TO orders_writer;
                 CREATE ROLE orders_owner NOLOGIN;
                 CREATE ROLE mayfly_manager LOGIN CREATEROLE \
                   PASSWORD '{ORDERS_MANAGER_PASSWORD}';"
            ),
        )
        .expect("the orders database");
        pg
    }

    /// Starts the stopped server again, on a new free port if its own is
    /// taken (the port is kept otherwise).
    pub fn start_again(&mut self) {
        for attempt in 0..5 {
            if self.port == 0 || attempt > 0 {
                self.port = free_port();
            }
            let mut ctl = as_server_user(&self.bin.join("pg_ctl"));
            ctl.arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                     -c max_connections=200",
                    self.port,
                    self.dir.path().display()
                ))
                .args(["-w", "-t", "30", "start"]);
            if ctl.output().is_ok_and(|o| o.status.success()) {
                self.running = true;
                return;
            }
        }
        panic!(
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// Stops the server (fast: sessions are ended), keeping its data.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let mut ctl = as_server_user(&self.bin.join("pg_ctl"));
        ctl.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        let _ = ctl.output();
        self.running = false;
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// A URL for `user` with `password` to `db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` with psql as the superuser in `db`; stdout (unaligned,
    /// tuples only) on success, the error text otherwise.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        psql(&self.url("postgres", &self.password, db), sql)
    }
}

/// Runs `sql` with psql against `url` (a DSN with its password in it);
/// stdout (unaligned, tuples only) on success, the error text otherwise.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(psql_bin())
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn psql_bin() -> PathBuf {
    let dir = bin_dir();
    if dir.join("psql").is_file() {
        dir.join("psql")
    } else {
        PathBuf::from("psql")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let mut ctl = as_server_user(&self.bin.join("pg_ctl"));
            ctl.arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "stop"]);
            let _ = ctl.output();
        }
    }
}
