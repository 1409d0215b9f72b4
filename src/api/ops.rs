//! Operations: health, readiness, Prometheus metrics, the web console's
//! files, and the server status.

use crate::env::Handling;
use crate::http::{Request, Response};
use crate::proto;
use crate::stats::Counters;

use super::call::{Call, Handled};
use super::error::{ApiError, Caller, Server};

pub(super) fn healthz(
    _req: &Request,
    _body: &[u8],
    _ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    Ok(Handled::Now(Response::with_body(
        200,
        "OK",
        "text/plain; charset=utf-8",
        b"ok\n",
        &[],
        call.close,
    )))
}

pub(super) fn readyz(
    _req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    if ctx.desk.shutting_down {
        return Err(ApiError::server(
            Server::ShuttingDown,
            "server shutting down",
        ));
    }
    // A server that stores cannot keep its promises while its database is
    // unreachable: a load balancer should send new clients elsewhere.
    if ctx.env.writer.as_ref().is_some_and(|w| !w.available()) {
        return Err(ApiError::server(
            Server::StorageUnavailable,
            "the database is unreachable (reconnecting)",
        ));
    }
    Ok(Handled::Now(Response::with_body(
        200,
        "OK",
        "text/plain; charset=utf-8",
        b"ready\n",
        &[],
        call.close,
    )))
}

pub(super) fn metrics(
    _req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    let shards: Vec<Counters> = ctx.env.all_stats.iter().map(|s| s.snapshot()).collect();
    let mut text = crate::stats::prometheus(&shards);
    crate::stats::prometheus_histograms(&ctx.env.all_stats, &mut text);
    let writer_errors = ctx.env.writer.as_ref().map_or(0, |w| w.stats().errors);
    crate::stats::prometheus_process(
        &[
            (
                "switchboard_accept_failures_total",
                "accept() calls that failed for want of descriptors or memory (accepting then pauses).",
                ctx.env.admission.accept_failures(),
            ),
            (
                "switchboard_ip_windows_evicted_total",
                "Per-IP limit windows forgotten early because the limiter's table was full.",
                ctx.env.limiter.evicted(),
            ),
            (
                "switchboard_store_errors_total",
                "Storage writes that failed in the writer (with or without a waiting client), plus failed prunes.",
                writer_errors,
            ),
        ],
        &mut text,
    );
    if let Some(w) = &ctx.env.writer {
        use std::fmt::Write;
        let st = w.stats();
        let _ = write!(
            text,
            "# HELP switchboard_writer_queue_bytes Bytes of requests queued for the storage writer or being applied (budget storage.queue_bytes).\n\
             # TYPE switchboard_writer_queue_bytes gauge\n\
             switchboard_writer_queue_bytes {}\n\
             # HELP switchboard_writer_refused_bytes_total Storage requests refused because storage.queue_bytes were queued.\n\
             # TYPE switchboard_writer_refused_bytes_total counter\n\
             switchboard_writer_refused_bytes_total {}\n",
            st.queued_bytes, st.refused_bytes
        );
        writer_metrics(w, &mut text);
    }
    Ok(Handled::Now(Response::with_body(
        200,
        "OK",
        "text/plain; version=0.0.4; charset=utf-8",
        text.as_bytes(),
        &[],
        call.close,
    )))
}

/// The storage writer's own counters (one writer per server, so no
/// `shard` label): commits and records per commit (`ops / batches`)
/// and whether its database is reachable. Its errors are the process-wide
/// `switchboard_store_errors_total` (a name appears once in /metrics).
fn writer_metrics(w: &crate::store::WriterHandle, out: &mut String) {
    use std::fmt::Write;
    let st = w.stats();
    let lines: [(&str, &str, &str, u64); 5] = [
        (
            "switchboard_store_batches_total",
            "counter",
            "Backend calls of the writer (one transaction each, unless a statement had to be isolated).",
            st.batches,
        ),
        (
            "switchboard_store_ops_total",
            "counter",
            "Requests applied by the writer (ops / batches = requests per commit).",
            st.ops,
        ),
        (
            "switchboard_store_commit_seconds_total",
            "counter",
            "Time the writer spent in the backend applying batches.",
            st.commit_us,
        ),
        (
            "switchboard_store_queue_depth",
            "gauge",
            "Requests waiting for the writer.",
            u64::try_from(w.depth()).unwrap_or(u64::MAX),
        ),
        (
            "switchboard_store_available",
            "gauge",
            "1 while the database can take writes, 0 while a database connection is down.",
            u64::from(w.available()),
        ),
    ];
    for (name, kind, help, v) in lines {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        if name == "switchboard_store_commit_seconds_total" {
            let _ = writeln!(out, "{name} {}", v as f64 / 1e6);
        } else {
            let _ = writeln!(out, "{name} {v}");
        }
    }
}

/// Headers of the console's files. The page holds an API key and a token
/// while in use: it may run only its own script and style (no inline code,
/// nothing from elsewhere), may not be framed (clickjacking), and its files
/// are never sniffed as another type. It talks to the server named in its
/// URL field, so `connect-src` allows any WebSocket or HTTP(S) endpoint.
pub(super) const CONSOLE_HEADERS: &[(&str, &str)] = &[
    ("Cache-Control", "no-cache"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss: http: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
];

pub(super) fn console(
    req: &Request,
    _body: &[u8],
    _ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    match crate::console::asset(&req.path) {
        Some((ctype, bytes)) => Ok(Handled::Now(Response::with_body(
            200,
            "OK",
            ctype,
            bytes,
            CONSOLE_HEADERS,
            call.close,
        ))),
        None => Err(ApiError::caller(Caller::NotFound, "no such file")),
    }
}

pub(super) fn status(
    _req: &Request,
    _body: &[u8],
    ctx: &mut Handling<'_>,
    call: &Call<'_>,
) -> Result<Handled, ApiError> {
    call.ok(&status_json(ctx))
}

fn status_json(ctx: &Handling<'_>) -> Vec<u8> {
    use std::io::Write;
    let shards: Vec<Counters> = ctx.env.all_stats.iter().map(|s| s.snapshot()).collect();
    let mut t = Counters::default();
    for c in &shards {
        t.add(c);
    }
    let mut b = Vec::new();
    b.extend_from_slice(b"{\"version\":");
    proto::write_str(&mut b, env!("CARGO_PKG_VERSION"));
    let _ = write!(
        b,
        ",\"uptimeSeconds\":{},\"connections\":{},\"usersOnline\":{},\"channels\":{},\"messagesIn\":{},\"messagesOut\":{},\"bytesIn\":{},\"bytesOut\":{},\"slowConsumerCloses\":{},\"rejectedConnections\":{},\"revokedCloses\":{},\"recordsStored\":{},\"writerQueueDepth\":{},\"storage\":{},\"shards\":[",
        ctx.env.uptime_secs(),
        ctx.env.open_connections(),
        ctx.env.router.user_count(),
        ctx.env.router.channel_count(),
        t.messages_in,
        t.messages_out,
        t.bytes_in,
        t.bytes_out,
        t.slow_consumers,
        t.rejected,
        t.revoked_closes,
        t.records_stored,
        ctx.env.writer.as_ref().map_or(0, |w| w.depth()),
        ctx.env.storage(),
    );
    for (i, c) in shards.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        let _ = write!(
            b,
            "{{\"shard\":{i},\"connections\":{},\"sockets\":{},\"messagesIn\":{},\"messagesOut\":{},\"bytesIn\":{},\"bytesOut\":{},\"slowConsumerCloses\":{},\"rejectedConnections\":{},\"publications\":{}}}",
            c.connections,
            c.sockets,
            c.messages_in,
            c.messages_out,
            c.bytes_in,
            c.bytes_out,
            c.slow_consumers,
            c.rejected,
            c.publications,
        );
    }
    b.extend_from_slice(b"]}");
    b
}
