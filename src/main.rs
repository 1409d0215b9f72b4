//! The `switchboard` binary: CLI -> config -> logging -> server -> signal -> shutdown.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::{Config, Overrides};
use switchboard::{Server, logging};

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Real-time WebSocket gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to bind (default 127.0.0.1).
        #[arg(long)]
        host: Option<String>,
        /// Port to listen on (default 8080; 0 picks a free port).
        #[arg(long)]
        port: Option<u16>,
        /// Shard (reactor) threads; default: one per core.
        #[arg(long)]
        shards: Option<usize>,
        /// debug, info, warn or error.
        #[arg(long, value_name = "LEVEL")]
        log_level: Option<String>,
    },
    /// Print the effective configuration (file + environment + defaults) as TOML.
    Config {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print a development token the configured server accepts.
    Token {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// Allowed channel patterns, comma-separated (`room:*,public:*`).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
        /// `admin` may subscribe, publish and broadcast anywhere.
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// Token id (`jti`).
        #[arg(long)]
        jti: Option<String>,
        /// Lifetime (`1h`, `30m`, ...).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Private key PEM, for servers that verify with a public key.
        #[arg(long, value_name = "PEM")]
        key: Option<PathBuf>,
        /// Algorithm (default: the first in auth.jwt.algorithms).
        #[arg(long)]
        alg: Option<String>,
    },
    /// Print ingested records as JSON lines, encrypted fields decrypted (docs/STORAGE.md).
    Decrypt {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Table to read (default: ingest.table).
        #[arg(long, value_name = "NAME")]
        table: Option<String>,
        /// Only records with a larger id (the last id printed, to page).
        #[arg(long, value_name = "N", default_value_t = 0)]
        after_id: i64,
        /// At most N records (default: all).
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Only this user's records.
        #[arg(long, value_name = "ID")]
        user: Option<String>,
    },
    /// Copy the SQLite store of storage.data_dir into the empty PostgreSQL
    /// schema of [storage.postgres] (stop the server first; docs/STORAGE.md).
    MigrateStore {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            host,
            port,
            shards,
            log_level,
        } => {
            let overrides = Overrides {
                host,
                port,
                shards,
                log_level,
            };
            serve(config, overrides)
        }
        Command::Token {
            config,
            sub,
            channels,
            role,
            tenant,
            jti,
            ttl,
            key,
            alg,
        } => {
            let cfg = match Config::load(config.as_deref(), &Overrides::default()) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let ttl = match switchboard::config::parse_duration(&ttl) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("switchboard: invalid --ttl: {e}");
                    return ExitCode::from(2);
                }
            };
            let t = switchboard::auth::dev::DevToken {
                sub,
                channels,
                role,
                tenant,
                jti,
                ttl,
                private_key: key,
                algorithm: alg,
            };
            match switchboard::auth::dev::mint_dev_token(&cfg.auth, &t) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Decrypt {
            config,
            table,
            after_id,
            limit,
            user,
        } => {
            let opts = switchboard::decrypt::ExportOptions {
                table,
                after_id,
                limit,
                user,
            };
            match switchboard::decrypt::run(config.as_deref(), &opts) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::MigrateStore { config } => {
            let cfg = match Config::load(config.as_deref(), &Overrides::default()) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            match switchboard::migrate::migrate(&cfg) {
                Ok(report) => {
                    for (table, n) in &report.tables {
                        println!("{table}: {n} rows");
                    }
                    println!(
                        "copied {} into {}",
                        cfg.storage
                            .data_dir
                            .join(switchboard::store::sqlite::DB_FILE)
                            .display(),
                        report.target
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Config { config } => {
            match Config::load(config.as_deref(), &Overrides::default()) {
                Ok(cfg) => match toml::to_string_pretty(&cfg) {
                    Ok(s) => {
                        print!("{s}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(e),
                },
                Err(e) => fail(e),
            }
        }
    }
}

/// One line naming the problem, exit code 2 (configuration or startup).
/// Messages from libraries (TLS, TOML, SQLite) may carry line breaks: they
/// are folded so the promise of one line holds.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    let text = e.to_string();
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("switchboard: {line}");
    ExitCode::from(2)
}

fn serve(file: Option<PathBuf>, overrides: Overrides) -> ExitCode {
    let cfg = match Config::load(file.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    logging::init(&cfg.log_level, cfg.log_format);
    // Until the server runs, log lines wait: a start that fails prints one line.
    logging::hold();
    match switchboard::raise_fd_limit() {
        Ok((before, after, hard)) => log::info!(
            "open-file limit: soft {before} -> {after} (hard {hard}); that caps connections per process"
        ),
        Err(e) => log::warn!("cannot read or raise the open-file limit: {e}"),
    }
    // Handlers first: a signal during startup must not kill the process uncleanly.
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            logging::fail();
            return fail(format!("cannot install signal handlers: {e}"));
        }
    };
    let timeout = cfg.shutdown_timeout;
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            logging::fail();
            return fail(e);
        }
    };
    logging::release();
    let sig = signals
        .forever()
        .next()
        .unwrap_or(signal_hook::consts::SIGTERM);
    log::info!("signal {sig}: stopping accepts, closing clients with 1001 (timeout {timeout:?})");
    let report = server.shutdown();
    if report.shards_timed_out > 0 {
        log::warn!(
            "shutdown deadline reached on {} shard(s); remaining sockets were dropped",
            report.shards_timed_out
        );
    }
    log::info!("stopped ({} connections were open)", report.connections);
    ExitCode::SUCCESS
}
