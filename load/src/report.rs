//! The readable summary and the one-line JSON of each mode.

use serde_json::{Value, json};

use crate::connect::ConnectReport;
use crate::echo::EchoReport;
use crate::fanout::FanoutReport;
use crate::hist::Histogram;
use crate::procfs::{Delta, human_bytes};

pub(crate) fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

/// "512.3 µs" or "1.25 ms".
pub(crate) fn dur(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} µs", ns as f64 / 1e3)
    }
}

pub(crate) fn latency_json(h: &Histogram) -> Value {
    json!({
        "samples": h.count(),
        "min": us(h.min()),
        "p50": us(h.quantile(0.5)),
        "p90": us(h.quantile(0.9)),
        "p99": us(h.quantile(0.99)),
        "p999": us(h.quantile(0.999)),
        "max": us(h.max()),
        "mean": (h.mean() / 100.0).round() / 10.0,
    })
}

pub(crate) fn latency_line(h: &Histogram) -> String {
    if h.count() == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}  (mean {}, {} samples)",
        dur(h.quantile(0.5)),
        dur(h.quantile(0.99)),
        dur(h.quantile(0.999)),
        dur(h.max()),
        dur(h.mean() as u64),
        h.count()
    )
}

pub(crate) fn server_json(pid: Option<u32>, d: Option<&Delta>) -> Value {
    match (pid, d) {
        (Some(pid), Some(d)) => json!({
            "pid": pid,
            "cpu_s": (d.cpu_s * 100.0).round() / 100.0,
            "wall_s": (d.wall_s * 1000.0).round() / 1000.0,
            "cpu_cores": (d.cores() * 1000.0).round() / 1000.0,
            "rss_before_bytes": d.rss_before,
            "rss_after_bytes": d.rss_after,
        }),
        _ => Value::Null,
    }
}

pub fn print_echo(r: &EchoReport, url: &str, pid: Option<u32>) {
    let o = &r.opts;
    println!("switchboard-load echo  {url}");
    println!(
        "  connections   {} opened of {}; {} B {} payloads, {} in flight each",
        r.opened,
        o.connections,
        o.size,
        if o.binary { "binary" } else { "text" },
        o.depth
    );
    println!(
        "  window        {:.2} s measured after {:.1} s warmup",
        r.window_s,
        o.warmup.as_secs_f64()
    );
    println!(
        "  throughput    {:.0} msg/s  ({} round trips in the window; {} sent, {} echoed in all)",
        r.msgs_per_sec(),
        r.measured,
        r.sent_total,
        r.completed_total
    );
    println!("  round trip    {}", latency_line(&r.latency));
    let e = &r.errors;
    if e.total() == 0 {
        println!("  verification  ok: every echo in order and byte-identical; no errors");
    } else {
        let kinds: Vec<String> = e
            .kinds()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("  verification  FAILED: {}", kinds.join(", "));
    }
    if let Some(f) = &r.connect_failure {
        println!("  first connect failure: {f}");
    }
    if let Some(p) = &r.first_problem {
        println!("  first problem: {p}");
    }
    println!(
        "  close         {} of {} answered our close frame; {} pings answered",
        r.closed_cleanly, r.opened, r.pings
    );
    if let (Some(pid), Some(d)) = (pid, r.server.as_ref()) {
        let per_msg = if r.measured > 0 {
            format!("{:.2} µs/msg", d.cpu_s * 1e6 / r.measured as f64)
        } else {
            "- µs/msg".into()
        };
        println!(
            "  server {pid}  cpu {:.2} s in {:.2} s ({:.0}% of one core), {per_msg}",
            d.cpu_s,
            d.wall_s,
            d.cores() * 100.0
        );
        println!(
            "               user-space RSS {} -> {} (socket buffers are kernel memory, not included)",
            human_bytes(d.rss_before as f64),
            human_bytes(d.rss_after as f64)
        );
    }
    if let Some(c) = &r.client {
        println!(
            "  client        cpu {:.2} s ({:.0}% of one core)",
            c.cpu_s,
            c.cores() * 100.0
        );
    }
}

pub fn echo_json(r: &EchoReport, url: &str, pid: Option<u32>) -> Value {
    let o = &r.opts;
    let e = &r.errors;
    let mut server = server_json(pid, r.server.as_ref());
    if let (Some(obj), Some(d)) = (server.as_object_mut(), r.server.as_ref()) {
        let per =
            (r.measured > 0).then(|| (d.cpu_s * 1e6 / r.measured as f64 * 1000.0).round() / 1000.0);
        obj.insert("cpu_us_per_msg".into(), json!(per));
    }
    let mut errors = serde_json::Map::new();
    for (k, n) in e.kinds() {
        errors.insert(k.into(), json!(n));
    }
    errors.insert("total".into(), json!(e.total()));
    json!({
        "mode": "echo",
        "url": url,
        "connections": o.connections,
        "opened": r.opened,
        "size": o.size,
        "depth": o.depth,
        "binary": o.binary,
        "warmup_s": o.warmup.as_secs_f64(),
        "duration_s": o.duration.as_secs_f64(),
        "window_s": (r.window_s * 1000.0).round() / 1000.0,
        "messages": r.measured,
        "msgs_per_sec": r.msgs_per_sec().round(),
        "sent_total": r.sent_total,
        "echoed_total": r.completed_total,
        "latency_us": latency_json(&r.latency),
        "errors": errors,
        "connect_failure": r.connect_failure,
        "first_problem": r.first_problem,
        "closed_cleanly": r.closed_cleanly,
        "pings_answered": r.pings,
        "server": server,
        "client": r.client.as_ref().map(|c| json!({
            "cpu_s": (c.cpu_s * 100.0).round() / 100.0,
            "cpu_cores": (c.cores() * 1000.0).round() / 1000.0,
        })),
    })
}

pub(crate) fn map_line(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn print_connect(r: &ConnectReport, url: &str, pid: Option<u32>) {
    let o = &r.opts;
    println!("switchboard-load connect  {url}");
    println!(
        "  attempted     {} at {:.0}/s from {} (open-file limit {})",
        r.attempted,
        o.ramp,
        if r.sources > 1 {
            format!("127.0.0.1..127.0.0.{}", r.sources)
        } else if r.sources == 1 {
            "127.0.0.1".into()
        } else {
            "a kernel-chosen address".into()
        },
        r.fd_limit
    );
    println!(
        "  ramp          {:.2} s ({:.0} upgrades/s); upgrade time {}",
        r.ramp_s,
        if r.ramp_s > 0.0 {
            r.opened as f64 / r.ramp_s
        } else {
            0.0
        },
        latency_line(&r.handshake)
    );
    println!(
        "  open          {} upgraded, {} still open after {:.2} s hold; {} pings answered",
        r.opened, r.open_at_end, r.hold_s, r.pings
    );
    if r.failures.is_empty() && r.dropped.is_empty() {
        println!("  failures      none");
    } else {
        if !r.failures.is_empty() {
            println!("  failures      {}", map_line(&r.failures));
        }
        if !r.dropped.is_empty() {
            println!("  lost while held  {}", map_line(&r.dropped));
        }
        if let Some(f) = &r.first_failure {
            println!("  first failure {f}");
        }
    }
    println!(
        "  close         {} of {} answered our close frame",
        r.closed_cleanly, r.close_sent
    );
    if let (Some(pid), Some(ramp), Some(hold)) =
        (pid, r.server_ramp.as_ref(), r.server_hold.as_ref())
    {
        println!(
            "  server {pid}  cpu {:.2} s during the ramp, {:.2} s during the hold ({:.1}% of one core)",
            ramp.cpu_s,
            hold.cpu_s,
            hold.cores() * 100.0
        );
        println!(
            "               user-space RSS {} before, {} after the ramp, {} at the end of the hold",
            human_bytes(ramp.rss_before as f64),
            human_bytes(ramp.rss_after as f64),
            human_bytes(hold.rss_after as f64)
        );
        if let Some(b) = r.rss_per_connection() {
            println!(
                "               {} of user-space RSS per open connection (socket buffers are kernel memory, not included)",
                human_bytes(b)
            );
        }
    }
}

pub fn connect_json(r: &ConnectReport, url: &str, pid: Option<u32>) -> Value {
    let o = &r.opts;
    let server = match (pid, r.server_ramp.as_ref(), r.server_hold.as_ref()) {
        (Some(pid), Some(ramp), Some(hold)) => json!({
            "pid": pid,
            "rss_baseline_bytes": ramp.rss_before,
            "rss_after_ramp_bytes": ramp.rss_after,
            "rss_end_of_hold_bytes": hold.rss_after,
            "rss_bytes_per_connection": r.rss_per_connection().map(f64::round),
            "cpu_ramp_s": (ramp.cpu_s * 100.0).round() / 100.0,
            "cpu_hold_s": (hold.cpu_s * 100.0).round() / 100.0,
            "cpu_hold_cores": (hold.cores() * 1000.0).round() / 1000.0,
        }),
        _ => Value::Null,
    };
    json!({
        "mode": "connect",
        "url": url,
        "connections": o.connections,
        "ramp_per_s": o.ramp,
        "hold_s": (r.hold_s * 1000.0).round() / 1000.0,
        "sources": r.sources,
        "fd_limit": r.fd_limit,
        "attempted": r.attempted,
        "opened": r.opened,
        "open_at_end": r.open_at_end,
        "failures": r.failures,
        "dropped": r.dropped,
        "problems": r.problems(),
        "first_failure": r.first_failure,
        "ramp_s": (r.ramp_s * 1000.0).round() / 1000.0,
        "upgrade_us": latency_json(&r.handshake),
        "pings_answered": r.pings,
        "close_sent": r.close_sent,
        "closed_cleanly": r.closed_cleanly,
        "server": server,
    })
}

pub fn print_fanout(r: &FanoutReport, url: &str, pid: Option<u32>) {
    let o = &r.opts;
    println!("switchboard-load fanout  {url}");
    println!(
        "  subscribers   {} subscribed of {} to {:?} from {} (open-file limit {}); publisher {:?}",
        r.subscribed,
        o.subscribers,
        o.channel,
        match r.sources {
            0 => "a kernel-chosen address".to_owned(),
            1 => "127.0.0.1".to_owned(),
            n => format!("127.0.0.1..127.0.0.{n}"),
        },
        r.fd_limit,
        r.publisher
    );
    println!(
        "  setup         {:.2} s at {:.0}/s; dial to subscribed {}",
        r.setup_s,
        o.ramp,
        latency_line(&r.subscribe_time)
    );
    println!(
        "  load          {} publishes in flight, ~{} B data each",
        o.inflight, o.size
    );
    println!(
        "  window        {:.2} s measured after {:.1} s warmup",
        r.window_s,
        o.warmup.as_secs_f64()
    );
    println!(
        "  throughput    {:.0} publishes/s, {:.0} deliveries/s ({} publishes x {} subscribers in the window)",
        r.publishes_per_sec(),
        r.deliveries_per_sec(),
        r.publishes,
        r.live_at_start
    );
    println!(
        "  totals        {} published, {} completed, {} acknowledged; {} deliveries received",
        r.sent_total, r.completed_total, r.acks, r.received_total
    );
    println!("  latency       {}", latency_line(&r.latency));
    if r.slow_path > 0 {
        println!(
            "  note          {} message events did not match the expected envelope byte for byte and were parsed as JSON (slow path)",
            r.slow_path
        );
    }
    let e = &r.errors;
    if e.total() == 0 {
        println!(
            "  verification  ok: every subscriber got every publish once, in order, intact; no errors"
        );
    } else {
        let kinds: Vec<String> = e
            .kinds()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("  verification  FAILED: {}", kinds.join(", "));
    }
    if !r.failures.is_empty() {
        println!("  not subscribed  {}", map_line(&r.failures));
    }
    if let Some(f) = &r.first_failure {
        println!("  first setup failure: {f}");
    }
    if let Some(p) = &r.first_problem {
        println!("  first problem: {p}");
    }
    println!(
        "  close         {} of {} answered our close frame; {} pings answered",
        r.closed_cleanly, r.close_sent, r.pings
    );
    if let (Some(pid), Some(d)) = (pid, r.server.as_ref()) {
        let per = r
            .server_us_per_delivery()
            .map_or("- µs/delivery".into(), |u| format!("{u:.3} µs/delivery"));
        println!(
            "  server {pid}  cpu {:.2} s in {:.2} s ({:.0}% of one core), {per}",
            d.cpu_s,
            d.wall_s,
            d.cores() * 100.0
        );
        println!(
            "               user-space RSS {} -> {} (socket buffers are kernel memory, not included)",
            human_bytes(d.rss_before as f64),
            human_bytes(d.rss_after as f64)
        );
    }
    if let Some(c) = &r.client {
        println!(
            "  client        cpu {:.2} s ({:.0}% of one core)",
            c.cpu_s,
            c.cores() * 100.0
        );
    }
}

pub fn fanout_json(r: &FanoutReport, url: &str, pid: Option<u32>) -> Value {
    let o = &r.opts;
    let e = &r.errors;
    let mut server = server_json(pid, r.server.as_ref());
    if let Some(obj) = server.as_object_mut() {
        obj.insert(
            "cpu_us_per_delivery".into(),
            json!(
                r.server_us_per_delivery()
                    .map(|u| (u * 1000.0).round() / 1000.0)
            ),
        );
    }
    let mut errors = serde_json::Map::new();
    for (k, n) in e.kinds() {
        errors.insert(k.into(), json!(n));
    }
    errors.insert("total".into(), json!(e.total()));
    json!({
        "mode": "fanout",
        "url": url,
        "subscribers": o.subscribers,
        "subscribed": r.subscribed,
        "live_at_start": r.live_at_start,
        "channel": o.channel,
        "publisher": r.publisher,
        "inflight": o.inflight,
        "size": o.size,
        "ramp_per_s": o.ramp,
        "sources": r.sources,
        "fd_limit": r.fd_limit,
        "setup_s": (r.setup_s * 1000.0).round() / 1000.0,
        "warmup_s": o.warmup.as_secs_f64(),
        "duration_s": o.duration.as_secs_f64(),
        "window_s": (r.window_s * 1000.0).round() / 1000.0,
        "publishes": r.publishes,
        "publishes_per_sec": (r.publishes_per_sec() * 10.0).round() / 10.0,
        "deliveries": r.deliveries(),
        "deliveries_per_sec": r.deliveries_per_sec().round(),
        "received_in_window": r.received_window,
        "sent_total": r.sent_total,
        "completed_total": r.completed_total,
        "received_total": r.received_total,
        "published_acks": r.acks,
        "slow_path_messages": r.slow_path,
        "latency_us": latency_json(&r.latency),
        "subscribe_us": latency_json(&r.subscribe_time),
        "errors": errors,
        "failures": r.failures,
        "first_failure": r.first_failure,
        "first_problem": r.first_problem,
        "close_sent": r.close_sent,
        "closed_cleanly": r.closed_cleanly,
        "pings_answered": r.pings,
        "server": server,
        "client": r.client.as_ref().map(|c| json!({
            "cpu_s": (c.cpu_s * 100.0).round() / 100.0,
            "cpu_cores": (c.cores() * 1000.0).round() / 1000.0,
        })),
    })
}
