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
    Echo(echo::EchoOpts),
    /// Open many idle connections at a fixed rate and hold them.
    Connect(connect::ConnectOpts),
    /// Channel fan-out on the JSON protocol: N subscribers, one publisher,
    /// K publishes in flight; verified deliveries/s and delivery latency.
    Fanout(fanout::FanoutOpts),
    /// Durable sensor-data ingestion: C connections, W records in flight
    /// each; every record acknowledged once after its commit; durable
    /// records/s and ack latency.
    Ingest(ingest::IngestOpts),
    /// Publishes through the HTTP API (POST /api/publish, keep-alive,
    /// pipelined) delivered to N WebSocket subscribers; verified deliveries,
    /// API publishes/s, HTTP and end-to-end latency.
    Api(api::ApiOpts),
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
    let common = &cli.common;
    let (no_time, bad_ramp) = (NO_DURATION, BAD_RAMP);
    match cli.mode {
        Mode::Echo(a) => {
            if let Err(code) = check(&[(a.duration.is_zero(), no_time)]) {
                return code;
            }
            finish(echo::run(&url, addr, pid, &a), &url_s, common)
        }
        Mode::Connect(a) => {
            if let Err(code) = check(&[(!per_second(a.ramp), bad_ramp)]) {
                return code;
            }
            finish(connect::run(&url, addr, pid, &a), &url_s, common)
        }
        Mode::Fanout(a) => {
            let checks = [
                (a.duration.is_zero(), no_time),
                (!per_second(a.ramp), bad_ramp),
                (
                    a.subscribers == 0 || a.inflight == 0,
                    "--subscribers and --inflight must be at least 1",
                ),
            ];
            if let Err(code) = check(&checks) {
                return code;
            }
            finish(fanout::run(&url, addr, pid, &a), &url_s, common)
        }
        Mode::Ingest(a) => {
            let checks = [
                (a.duration.is_zero(), no_time),
                (
                    a.connections == 0 || a.inflight == 0,
                    "--connections and --inflight must be at least 1",
                ),
            ];
            if let Err(code) = check(&checks) {
                return code;
            }
            finish(ingest::run(&url, addr, pid, &a), &url_s, common)
        }
        Mode::Api(mut a) => {
            let checks = [
                (a.duration.is_zero(), no_time),
                (!per_second(a.ramp), bad_ramp),
                (
                    a.subscribers == 0 || a.connections == 0 || a.inflight == 0,
                    "--subscribers, --connections and --inflight must be at least 1",
                ),
                (!a.api_path.starts_with('/'), "--api-path must start with /"),
            ];
            if let Err(code) = check(&checks) {
                return code;
            }
            a.api_key = a.api_key.filter(|k| !k.is_empty());
            finish(api::run(&url, addr, pid, &a), &url_s, common)
        }
    }
}

const NO_DURATION: &str = "--duration must be greater than 0";
const BAD_RAMP: &str = "--ramp must be a positive number of connections per second";

/// A rate that can be scheduled.
fn per_second(rate: f64) -> bool {
    rate > 0.0 && rate.is_finite()
}

/// The checks clap does not make, in order: the first that failed ends the
/// run (status 2).
fn check(checks: &[(bool, &str)]) -> Result<(), ExitCode> {
    match checks.iter().find(|(failed, _)| *failed) {
        Some((_, msg)) => Err(fail(msg)),
        None => Ok(()),
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
