//! `mayfly`: run the broker, set up a development PKI, and act as an agent
//! (tasks, tokens) or an operator (leases, revocation).

#![forbid(unsafe_code)]

// The broker allocates per request on every core; with mimalloc's
// thread-local heaps it issues about 7% more tokens than with glibc's
// malloc, measured in the same run (docs/performance.md).
#[cfg(feature = "broker")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` and `print!` for this crate: a closed output pipe (`mayfly
/// … | head -2`) ends the program quietly instead of panicking; any other
/// write error is one line on stderr.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::output::stdout_failed(&e);
        }
    }};
}

/// See [`println!`].
macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            $crate::output::stdout_failed(&e);
        }
    }};
}

mod agent;
mod approval;
mod audit;
#[cfg(feature = "broker")]
mod ca;
mod cert;
#[cfg(feature = "broker")]
mod config_check;
mod conn;
mod db;
#[cfg(feature = "broker")]
mod dev;
#[cfg(feature = "broker")]
mod keys;
mod operator;
mod output;
mod policy;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::conn::ConnArgs;

/// Just-in-time, task-scoped credentials for AI agents.
#[derive(Debug, Parser)]
#[command(name = "mayfly", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker with a configuration file.
    #[cfg(feature = "broker")]
    Serve {
        /// Path to mayfly.toml.
        #[arg(long, env = "MAYFLY_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Development setup: a local PKI and a broker that uses it.
    #[cfg(feature = "broker")]
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Run the tool-call gateway in front of MCP servers and HTTP APIs.
    Gateway {
        /// Path to gateway.toml.
        #[arg(long, env = "MAYFLY_GATEWAY_CONFIG")]
        config: std::path::PathBuf,
    },
    /// Tasks: start, inspect and complete (agents); list and revoke (operators).
    #[command(subcommand)]
    Task(agent::TaskCommand),
    /// Access tokens (agents).
    #[command(subcommand)]
    Token(agent::TokenCommand),
    /// Task-bound X.509 certificates (agents).
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Logins in the databases the broker manages (agents).
    #[command(subcommand)]
    Db(db::DbCommand),
    /// Leases (operators).
    #[command(subcommand)]
    Lease(operator::LeaseCommand),
    /// Agents (operators).
    #[command(subcommand)]
    Agent(operator::AgentCommand),
    /// Requests waiting for an operator's approval (operators).
    #[command(subcommand)]
    Approval(approval::ApprovalCommand),
    /// The audit trail: read it (operators), check its hash chain, and
    /// trace a task's delegation tree.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Cedar policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The broker's configuration.
    #[cfg(feature = "broker")]
    #[command(subcommand)]
    Config(ConfigCommand),
    /// JWT signing keys: rotate them without downtime (operators).
    #[cfg(feature = "broker")]
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Issuing CAs for task certificates: rotate them without downtime
    /// (operators).
    #[cfg(feature = "broker")]
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Write a new JWT signing key, for replicas that must share one.
    #[cfg(feature = "broker")]
    Keygen {
        /// ES256 (default) or EdDSA.
        #[arg(long, default_value = "ES256", value_parser = parse_algorithm)]
        algorithm: mayfly_broker::issuer::Algorithm,
        /// Where to write it (created 0600; name it jwt-es256.key or
        /// jwt-eddsa.key in the broker's data_dir).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory against Mayfly's schema; problems are
    /// printed as file:line:column: message.
    Check {
        /// The directory of *.cedar files.
        dir: std::path::PathBuf,
    },
}

#[cfg(feature = "broker")]
#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Load and check everything `serve` would (the file, TLS material,
    /// the issuing CA, the signing key, the policies, the store) without
    /// serving; a line per part, exit 1 if any fails.
    Check {
        /// Path to mayfly.toml.
        file: std::path::PathBuf,
        /// Also ask the Redis store whether it answers.
        #[arg(long)]
        store: bool,
    },
}

#[cfg(feature = "broker")]
fn parse_algorithm(s: &str) -> Result<mayfly_broker::issuer::Algorithm, String> {
    match s {
        "ES256" => Ok(mayfly_broker::issuer::Algorithm::ES256),
        "EdDSA" => Ok(mayfly_broker::issuer::Algorithm::EdDSA),
        _ => Err(format!("{s:?}: expected ES256 or EdDSA")),
    }
}

/// Logs to stderr: `RUST_LOG` filters (default info), `MAYFLY_LOG_FORMAT=json`
/// for log pipelines.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("MAYFLY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(feature = "broker")]
fn keygen(alg: mayfly_broker::issuer::Algorithm, out: &std::path::Path) -> anyhow::Result<()> {
    use mayfly_broker::issuer::SigningKey;
    SigningKey::generate_file(out, alg)?;
    let key = SigningKey::load(out, alg)?;
    println!("wrote {} ({}, kid {})", out.display(), key.alg(), key.kid());
    Ok(())
}

/// Runs the gateway until Ctrl-C or SIGTERM.
async fn gateway(path: &std::path::Path) -> anyhow::Result<()> {
    let config = mayfly_gateway::GatewayConfig::load(path)?;
    let running = mayfly_gateway::start(config).await?;
    running.wait_for_signal().await;
    Ok(())
}

/// One line that says what went wrong.
fn describe(e: &anyhow::Error) -> String {
    // A broker's refusal: its code in words and its message.
    let refused = |code: tonic::Code, message: &str| {
        let code = format!("{code:?}");
        let mut words = String::new();
        for (i, ch) in code.chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                words.push(' ');
            }
            words.push(ch.to_ascii_lowercase());
        }
        format!("{words}: {message}")
    };
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return refused(status.code(), status.message());
    }
    if let Some(refusal) = e.downcast_ref::<mayfly_client::Refusal>() {
        return refused(refusal.code, &refusal.message);
    }
    // The error and its causes, each once: many errors already quote their
    // source in their own message.
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        #[cfg(feature = "broker")]
        Command::Serve { config } => {
            init_logs();
            dev::serve(&config).await
        }
        #[cfg(feature = "broker")]
        Command::Dev(cmd) => dev::run(cmd).await,
        Command::Gateway { config } => {
            init_logs();
            gateway(&config).await
        }
        Command::Task(cmd) => agent::task(cmd, &cli.conn, cli.json).await,
        Command::Token(cmd) => agent::token(cmd, &cli.conn, cli.json).await,
        Command::Cert(cmd) => cert::run(cmd, &cli.conn, cli.json).await,
        Command::Db(cmd) => db::run(cmd, &cli.conn, cli.json).await,
        Command::Lease(cmd) => operator::lease(cmd, &cli.conn, cli.json).await,
        Command::Agent(cmd) => operator::agent(cmd, &cli.conn, cli.json).await,
        #[cfg(feature = "broker")]
        Command::Keygen { algorithm, out } => keygen(algorithm, &out),
        Command::Approval(cmd) => approval::run(cmd, &cli.conn, cli.json).await,
        Command::Audit(cmd) => audit::run(cmd, &cli.conn, cli.json).await,
        Command::Policy(PolicyCommand::Check { dir }) => policy::check(&dir),
        #[cfg(feature = "broker")]
        Command::Config(ConfigCommand::Check { file, store }) => {
            config_check::run(&file, store, cli.json).await
        }
        #[cfg(feature = "broker")]
        Command::Keys(cmd) => keys::run(cmd, cli.json),
        #[cfg(feature = "broker")]
        Command::Ca(cmd) => ca::run(cmd, cli.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<approval::StillPending>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("trail broken at line 3")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("{0}")]
        Quoting(#[source] Inner),
        #[error("starting")]
        Naming(#[source] Inner),
    }

    #[test]
    fn each_cause_is_told_once() {
        let quoting = anyhow::Error::new(Outer::Quoting(Inner));
        assert_eq!(describe(&quoting), "trail broken at line 3");
        let naming = anyhow::Error::new(Outer::Naming(Inner)).context("mayfly serve");
        assert_eq!(
            describe(&naming),
            "mayfly serve: starting: trail broken at line 3"
        );
    }
}
