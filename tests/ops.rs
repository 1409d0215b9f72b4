//! Health and metrics on the listener: /healthz, /readyz, and /metrics in the
//! Prometheus text format, whose counters move when traffic flows.

mod common;

use std::collections::HashMap;

use common::*;
use tungstenite::Message;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    let status = r.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = r
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Counters of the whole process (the acceptor, the per-IP limiter, the
/// storage writer): no `shard` label.
const PROCESS_WIDE: [&str; 3] = [
    "switchboard_accept_failures_total",
    "switchboard_ip_windows_evicted_total",
    "switchboard_store_errors_total",
];

/// Parse the exposition format strictly enough to catch mistakes: every
/// sample belongs to a metric declared by `# TYPE` before it.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut typed = HashMap::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("name and type");
            assert!(
                kind == "counter" || kind == "gauge" || kind == "histogram",
                "{line}"
            );
            typed.insert(name.to_owned(), kind.to_owned());
        } else if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let mut name = series.split('{').next().unwrap();
            // Histogram samples: <name>_bucket{le=..}, <name>_sum, <name>_count.
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && typed.get(base).map(String::as_str) == Some("histogram")
                {
                    name = base;
                }
            }
            assert!(typed.contains_key(name), "sample before its TYPE: {line}");
            if series.contains("_bucket{") {
                assert!(series.contains(",le=\""), "bucket without le: {line}");
            }
            if typed[name] == "counter" {
                assert!(name.ends_with("_total"), "counters end in _total: {name}");
            }
            if PROCESS_WIDE.contains(&name) {
                assert_eq!(series, name, "process-wide, without labels: {line}");
            } else {
                assert!(series.contains("{shard=\""), "{line}");
            }
            samples.insert(series.to_owned(), value.parse::<f64>().expect("a number"));
        }
    }
    samples
}

fn total(samples: &HashMap<String, f64>, metric: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(metric))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn health_ready_and_metrics() {
    let server = start(test_config(2));
    let addr = server.local_addr();
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz"), (200, "ready\n".into()));
    let r = http(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");

    let (status, before) = get(addr, "/metrics");
    assert_eq!(status, 200);
    let before = parse_metrics(&before);
    assert!(before.contains_key("switchboard_connections{shard=\"1\"}"));

    let mut clients: Vec<_> = (0..4).map(|_| ws(addr, "/echo")).collect();
    for c in clients.iter_mut() {
        for i in 0..25 {
            c.send(Message::text(format!("m{i}"))).unwrap();
            assert_eq!(c.read().unwrap(), Message::text(format!("m{i}")));
        }
    }
    wait_until("counters published", || server.stats().messages_in >= 100);
    let (_, after) = get(addr, "/metrics");
    let after = parse_metrics(&after);
    assert_eq!(
        total(&after, "switchboard_messages_in_total")
            - total(&before, "switchboard_messages_in_total"),
        100.0
    );
    assert_eq!(total(&after, "switchboard_connections"), 4.0);
    assert!(total(&after, "switchboard_upgrades_total") >= 4.0);
    assert!(
        total(&after, "switchboard_bytes_in_total") > total(&before, "switchboard_bytes_in_total")
    );
    for name in PROCESS_WIDE {
        assert_eq!(after.get(name), Some(&0.0), "{name}");
    }
}
