//! `switchboard-load`: the load generator for Switchboard (and any RFC 6455
//! echo server).
//!
//! * `echo`: many connections on one mio poll loop, a fixed number of
//!   messages in flight on each; every echo is checked for loss,
//!   duplication, reordering and corruption; throughput and round-trip
//!   latency are reported.
//! * `connect`: open many idle connections at a fixed rate (from several
//!   loopback source addresses if needed), hold them while answering the
//!   server's pings, then close them cleanly.
//! * `fanout`: the JSON protocol on `/ws`: N subscribers on one channel, one
//!   publisher keeping K publishes in flight (the next one is sent when all
//!   N have received one); every subscriber checks it gets every publish
//!   exactly once, in order and intact; publishes/s, deliveries/s and
//!   delivery latency are reported.
//! * `ingest`: durable sensor-data ingestion: C connections, W
//!   `sensor_data` records in flight on each; every record must get exactly
//!   one `ack` (sent after the commit) with its own client id and a record
//!   id of its own; `overloaded` records are sent again; durable records/s
//!   and ack latency are reported.
//! * `api`: publishes through the HTTP API (`POST /api/publish` on P
//!   keep-alive connections, K requests in flight, pipelined) delivered to
//!   N WebSocket subscribers; each checks every publish exactly once, in
//!   offset order, matching the HTTP answer; API publishes/s, HTTP and end
//!   to end latency are reported.
//!
//! With `--pid`, the server's CPU time and user-space RSS are read from
//! /proc at both ends of the measured window. With `--json`, one JSON line
//! follows the readable summary. Exit status: 0 when nothing went wrong,
//! 1 when any error was detected, 2 when the run could not be set up.
//!
//! One thread, no async runtime, no `unsafe`.

#![forbid(unsafe_code)]

mod api;
mod connect;
mod driver;
mod echo;
mod fanout;
mod hist;
mod ingest;
mod net;
mod procfs;
mod report;
mod url;
mod verify;
mod wire;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::report::Summary;

#[derive(Parser)]
#[command(
    name = "switchboard-load",
    version,
    about = "Load generator for Switchboard: verified echo throughput/latency, idle connection capacity, verified channel fan-out, durable ingestion, HTTP API publishing"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args)]
struct Common {
    /// Server endpoint: ws://HOST:PORT/PATH (no TLS) [default:
    /// ws://127.0.0.1:8080/echo, or ws://127.0.0.1:8080/ws for fanout,
    /// ingest and api; api posts to the same HOST:PORT].
    #[arg(long, global = true)]
    url: Option<String>,
    /// Server process id: report its CPU time and user-space RSS over the measured window.
    #[arg(long, global = true, value_name = "PID")]
    pid: Option<u32>,
    /// Also print one JSON line with every figure at the end.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Mode {
    /// Verified echo load: throughput, round-trip latency, errors by kind.
    Echo(EchoArgs),
    /// Open many idle connections at a fixed rate and hold them.
    Connect(ConnectArgs),
    /// Channel fan-out on the JSON protocol: N subscribers, one publisher,
    /// K publishes in flight; verified deliveries/s and delivery latency.
    Fanout(FanoutArgs),
    /// Durable sensor-data ingestion: C connections, W records in flight
    /// each; every record acknowledged once after its commit; durable
    /// records/s and ack latency.
    Ingest(IngestArgs),
    /// Publishes through the HTTP API (POST /api/publish, keep-alive,
    /// pipelined) delivered to N WebSocket subscribers; verified deliveries,
    /// API publishes/s, HTTP and end-to-end latency.
    Api(ApiArgs),
}

#[derive(Args)]
struct EchoArgs {
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// Payload bytes per message (at least 16 with --binary; 32 for text,
    /// whose header is written in hex).
    #[arg(short = 's', long, default_value_t = 32)]
    size: usize,
    /// Messages in flight per connection.
    #[arg(short = 'd', long, default_value_t = 8)]
    depth: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Binary messages instead of text.
    #[arg(long)]
    binary: bool,
}

#[derive(Args)]
struct ConnectArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    connections: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 2000.0)]
    ramp: f64,
    /// Seconds to hold the connections open after the ramp.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    hold: Duration,
    /// Source addresses 127.0.0.1..127.0.0.N to connect from (default:
    /// enough that none needs more than 25,000 ports).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: Option<u8>,
    /// Seconds allowed for one connection's TCP connect and upgrade.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    handshake_timeout: Duration,
}

#[derive(Args)]
struct FanoutArgs {
    /// Subscriber connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    subscribers: usize,
    /// Publishes in flight (each completes when every subscriber has it).
    #[arg(short = 'k', long, default_value_t = 4)]
    inflight: usize,
    /// Approximate bytes of each publish's data object.
    #[arg(short = 's', long, default_value_t = 64)]
    size: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// New subscriber connections per second during setup.
    #[arg(long, default_value_t = 2000.0)]
    ramp: f64,
    /// Source addresses 127.0.0.1..127.0.0.N to connect from (default:
    /// enough that none needs more than 25,000 ports).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: Option<u8>,
    /// The channel (`public:` channels may be used by anyone).
    #[arg(long, default_value = "public:bench")]
    channel: String,
    /// Seconds allowed for one subscriber's connect, upgrade and subscribe.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    handshake_timeout: Duration,
}

#[derive(Args)]
struct IngestArgs {
    /// Connections (users `<user-prefix>-<i>`).
    #[arg(short = 'c', long, default_value_t = 50)]
    connections: usize,
    /// Records in flight per connection (each completes with its ack).
    #[arg(short = 'w', long, default_value_t = 8)]
    inflight: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Connection i is the user `<prefix>-<i>` (`?userId=`; auth mode none).
    #[arg(long, default_value = "load")]
    user_prefix: String,
    /// Seconds allowed for one connection's connect, upgrade and welcome.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    handshake_timeout: Duration,
    /// Seconds to wait for the records in flight after the measured window
    /// (what is still unanswered then is counted unacked).
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    drain_timeout: Duration,
}

#[derive(Args)]
struct ApiArgs {
    /// Subscriber connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    subscribers: usize,
    /// HTTP/1.1 keep-alive connections issuing the publishes.
    #[arg(short = 'p', long, default_value_t = 4)]
    connections: usize,
    /// Publish requests in flight in total, pipelined on the connections
    /// (each completes when answered and delivered to every subscriber).
    #[arg(short = 'k', long, default_value_t = 8)]
    inflight: usize,
    /// Measured seconds (fractions allowed).
    #[arg(short = 't', long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// New subscriber connections per second during setup.
    #[arg(long, default_value_t = 2000.0)]
    ramp: f64,
    /// Source addresses 127.0.0.1..127.0.0.N to connect from (default:
    /// enough that none needs more than 25,000 ports).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: Option<u8>,
    /// The channel (the server's channel rules must let anyone subscribe).
    #[arg(long, default_value = "load")]
    channel: String,
    /// Sent as `Authorization: Bearer <KEY>`.
    #[arg(long, value_name = "KEY", env = "SWITCHBOARD_API_KEY")]
    api_key: Option<String>,
    /// The publish route.
    #[arg(long, default_value = "/api/publish")]
    api_path: String,
    /// Seconds allowed for one subscriber's connect, upgrade and subscribe.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    handshake_timeout: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=1e7).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let url_s = cli.common.url.clone().unwrap_or_else(|| {
        match cli.mode {
            Mode::Fanout(_) | Mode::Ingest(_) | Mode::Api(_) => "ws://127.0.0.1:8080/ws",
            _ => "ws://127.0.0.1:8080/echo",
        }
        .to_owned()
    });
    let url = match url::WsUrl::parse(&url_s) {
        Ok(u) => u,
        Err(e) => return fail(&e),
    };
    let addr = match url.resolve() {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let pid = cli.common.pid;
    if let Some(pid) = pid
        && let Err(e) = procfs::sample(&pid.to_string())
    {
        return fail(&format!("--pid {pid}: {e}"));
    }
    match cli.mode {
        Mode::Echo(a) => {
            if a.duration.is_zero() {
                return fail("--duration must be greater than 0");
            }
            let opts = echo::EchoOpts {
                connections: a.connections,
                size: a.size,
                depth: a.depth,
                duration: a.duration,
                warmup: a.warmup,
                binary: a.binary,
            };
            finish(echo::run(&url, addr, pid, &opts), &url_s, &cli.common)
        }
        Mode::Connect(a) => {
            if !(a.ramp > 0.0 && a.ramp.is_finite()) {
                return fail("--ramp must be a positive number of connections per second");
            }
            let opts = connect::ConnectOpts {
                connections: a.connections,
                ramp: a.ramp,
                hold: a.hold,
                sources: a.sources,
                handshake_timeout: a.handshake_timeout,
            };
            finish(connect::run(&url, addr, pid, &opts), &url_s, &cli.common)
        }
        Mode::Fanout(a) => {
            if a.duration.is_zero() {
                return fail("--duration must be greater than 0");
            }
            if !(a.ramp > 0.0 && a.ramp.is_finite()) {
                return fail("--ramp must be a positive number of connections per second");
            }
            if a.subscribers == 0 || a.inflight == 0 {
                return fail("--subscribers and --inflight must be at least 1");
            }
            let opts = fanout::FanoutOpts {
                subscribers: a.subscribers,
                inflight: a.inflight,
                size: a.size,
                duration: a.duration,
                warmup: a.warmup,
                ramp: a.ramp,
                sources: a.sources,
                channel: a.channel,
                handshake_timeout: a.handshake_timeout,
            };
            finish(fanout::run(&url, addr, pid, &opts), &url_s, &cli.common)
        }
        Mode::Ingest(a) => {
            if a.duration.is_zero() {
                return fail("--duration must be greater than 0");
            }
            if a.connections == 0 || a.inflight == 0 {
                return fail("--connections and --inflight must be at least 1");
            }
            let opts = ingest::IngestOpts {
                connections: a.connections,
                inflight: a.inflight,
                duration: a.duration,
                warmup: a.warmup,
                user_prefix: a.user_prefix,
                handshake_timeout: a.handshake_timeout,
                drain_timeout: a.drain_timeout,
            };
            finish(ingest::run(&url, addr, pid, &opts), &url_s, &cli.common)
        }
        Mode::Api(a) => {
            if a.duration.is_zero() {
                return fail("--duration must be greater than 0");
            }
            if !(a.ramp > 0.0 && a.ramp.is_finite()) {
                return fail("--ramp must be a positive number of connections per second");
            }
            if a.subscribers == 0 || a.connections == 0 || a.inflight == 0 {
                return fail("--subscribers, --connections and --inflight must be at least 1");
            }
            if !a.api_path.starts_with('/') {
                return fail("--api-path must start with /");
            }
            let opts = api::ApiOpts {
                subscribers: a.subscribers,
                connections: a.connections,
                inflight: a.inflight,
                duration: a.duration,
                warmup: a.warmup,
                ramp: a.ramp,
                sources: a.sources,
                channel: a.channel,
                api_key: a.api_key.filter(|k| !k.is_empty()),
                api_path: a.api_path,
                handshake_timeout: a.handshake_timeout,
            };
            finish(api::run(&url, addr, pid, &opts), &url_s, &cli.common)
        }
    }
}

/// Print the report of a run (and its JSON line with `--json`); the exit
/// status: 0 clean, 1 with errors, 2 when the run could not be set up.
fn finish(run: Result<impl Summary, String>, url: &str, common: &Common) -> ExitCode {
    let r = match run {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    r.print(url, common.pid);
    if common.json {
        println!("{}", r.to_json(url, common.pid));
    }
    if r.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("switchboard-load: {msg}");
    ExitCode::from(2)
}
