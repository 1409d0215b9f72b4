//! The skeleton every mode's report is built on: the readable summary's
//! shared lines, the JSON line's shared fields, and the number formats.
//! Each mode prints its own figures between them (see its `Summary`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::driver::Timing;
use crate::hist::Histogram;
use crate::procfs::{Delta, human_bytes};

/// What `main` does with a finished run.
pub trait Summary {
    /// The readable summary on stdout.
    fn print(&self, url: &str, pid: Option<u32>);
    /// Every figure as one JSON object.
    fn to_json(&self, url: &str, pid: Option<u32>) -> Value;
    /// Errors detected (0 for a clean run): the exit status.
    fn problems(&self) -> u64;
}

/// A struct of error counters, one `u64` per kind, declared in report
/// order, with `total()` and `kinds()` (name and count of each, in that
/// order: the report's lines and the JSON line's `errors`).
macro_rules! error_kinds {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $($(#[$doc:meta])* $kind:ident,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            $($(#[$doc])* pub $kind: u64,)*
        }

        impl $name {
            pub fn total(&self) -> u64 {
                $crate::report::total(&self.kinds())
            }

            /// Kinds and counts, in report order.
            pub fn kinds(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($kind), self.$kind)),*]
            }
        }
    };
}
pub(crate) use error_kinds;

/// Errors by kind, in report order.
pub type Kinds<'a> = &'a [(&'static str, u64)];

/// Sum of every kind.
pub fn total(kinds: Kinds<'_>) -> u64 {
    kinds.iter().map(|(_, n)| n).sum()
}

/// Microseconds with one decimal, from nanoseconds.
pub(crate) fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

/// `v` rounded to `1 / scale`.
pub(crate) fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}

/// `n` per second of a window of `window_s` seconds.
pub(crate) fn per_sec(n: u64, window_s: f64) -> f64 {
    if window_s > 0.0 {
        n as f64 / window_s
    } else {
        0.0
    }
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

pub(crate) fn map_line(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where connections were dialed from.
pub(crate) fn sources_text(sources: usize) -> String {
    match sources {
        0 => "a kernel-chosen address".to_owned(),
        1 => "127.0.0.1".to_owned(),
        n => format!("127.0.0.1..127.0.0.{n}"),
    }
}

/// "  window ..." of a measured run.
pub(crate) fn window_line(window_s: f64, warmup: Duration) -> String {
    format!(
        "  window        {window_s:.2} s measured after {:.1} s warmup",
        warmup.as_secs_f64()
    )
}

/// "  verification ok: `ok`" when nothing went wrong, else the kinds that did.
pub(crate) fn print_verification(kinds: Kinds<'_>, ok: &str) {
    if total(kinds) == 0 {
        println!("  verification  ok: {ok}");
    } else {
        let kinds: Vec<String> = kinds
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("  verification  FAILED: {}", kinds.join(", "));
    }
}

/// The server's CPU (with `per`, its cost per unit of work) and RSS over
/// the window, when `--pid` was given.
pub(crate) fn print_server(
    pid: Option<u32>,
    d: Option<&Delta>,
    per: impl FnOnce(&Delta) -> String,
    rss_note: bool,
) {
    let (Some(pid), Some(d)) = (pid, d) else {
        return;
    };
    println!(
        "  server {pid}  cpu {:.2} s in {:.2} s ({:.0}% of one core), {}",
        d.cpu_s,
        d.wall_s,
        d.cores() * 100.0,
        per(d)
    );
    println!(
        "               user-space RSS {} -> {}{}",
        human_bytes(d.rss_before as f64),
        human_bytes(d.rss_after as f64),
        if rss_note {
            " (socket buffers are kernel memory, not included)"
        } else {
            ""
        }
    );
}

/// This process's CPU over the window.
pub(crate) fn print_client(c: Option<&Delta>) {
    if let Some(c) = c {
        println!(
            "  client        cpu {:.2} s ({:.0}% of one core)",
            c.cpu_s,
            c.cores() * 100.0
        );
    }
}

pub(crate) fn server_json(pid: Option<u32>, d: Option<&Delta>) -> Value {
    match (pid, d) {
        (Some(pid), Some(d)) => json!({
            "pid": pid,
            "cpu_s": round(d.cpu_s, 100.0),
            "wall_s": round(d.wall_s, 1000.0),
            "cpu_cores": round(d.cores(), 1000.0),
            "rss_before_bytes": d.rss_before,
            "rss_after_bytes": d.rss_after,
        }),
        _ => Value::Null,
    }
}

/// [`server_json`] with the CPU per unit of work (`cpu_us_per_...`, three
/// decimals) added when there is a server.
pub(crate) fn server_json_per(
    pid: Option<u32>,
    d: Option<&Delta>,
    per: &[(&str, Option<f64>)],
) -> Value {
    let mut server = server_json(pid, d);
    if let Some(obj) = server.as_object_mut() {
        for (k, v) in per {
            obj.insert((*k).into(), json!(v.map(|u| round(u, 1000.0))));
        }
    }
    server
}

pub(crate) fn client_json(c: Option<&Delta>) -> Value {
    match c {
        Some(c) => json!({
            "cpu_s": round(c.cpu_s, 100.0),
            "cpu_cores": round(c.cores(), 1000.0),
        }),
        None => Value::Null,
    }
}

/// The errors by kind and their total.
pub(crate) fn errors_json(kinds: Kinds<'_>) -> Value {
    let mut errors = Map::new();
    for (k, n) in kinds {
        errors.insert((*k).into(), json!(n));
    }
    errors.insert("total".into(), json!(total(kinds)));
    Value::Object(errors)
}

/// Add the fields of `more` (an object) to `v` (an object).
pub(crate) fn extend(mut v: Value, more: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), more) {
        a.extend(b);
    }
    v
}

/// What fanout, ingest and api count alike while they run: how setup
/// went, the first problem after it, the pings answered.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Connections dialed and not through setup yet.
    pub pending_setup: usize,
    /// Connections through setup (welcomed or subscribed).
    pub ready: usize,
    /// Connections that never got through setup, by kind.
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    pub first_problem: Option<String>,
    pub pings: u64,
}

impl Ledger {
    /// Remember the first problem after setup.
    pub fn problem(&mut self, what: impl FnOnce() -> String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what());
        }
    }

    /// A connection's setup ended without it getting through (counted once:
    /// `settled`), by kind and as a `connect` error.
    pub fn setup_failed(
        &mut self,
        settled: &mut bool,
        connect: &mut u64,
        kind: String,
        what: impl FnOnce() -> String,
    ) {
        if *settled {
            return;
        }
        *settled = true;
        self.pending_setup = self.pending_setup.saturating_sub(1);
        *connect += 1;
        *self.failures.entry(kind).or_default() += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some(what());
        }
    }

    /// A connection got through setup (counted once: `settled`).
    pub fn setup_done(&mut self, settled: &mut bool) {
        *settled = true;
        self.ready += 1;
        self.pending_setup = self.pending_setup.saturating_sub(1);
    }

    /// The shared part of the report of a run timed by `t`.
    pub fn outcome(
        self,
        t: &Timing,
        (warmup, duration): (Duration, Duration),
        close_sent: usize,
        closed_cleanly: usize,
    ) -> Outcome {
        Outcome {
            setup_s: t.setup_s(),
            window_s: t.window_s(),
            warmup,
            duration,
            server: t.server(),
            client: t.client(),
            failures: self.failures,
            first_failure: self.first_failure,
            first_problem: self.first_problem,
            close_sent,
            closed_cleanly,
            pings: self.pings,
        }
    }
}

/// What every run with setup, a measured window and verified traffic
/// reports besides its own figures (fanout, ingest and api).
#[derive(Debug)]
pub struct Outcome {
    pub setup_s: f64,
    pub window_s: f64,
    pub warmup: Duration,
    pub duration: Duration,
    /// The server over the window (`--pid`).
    pub server: Option<Delta>,
    /// This process over the window.
    pub client: Option<Delta>,
    /// Connections that never got through setup, by kind.
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    /// The first error after setup, as text.
    pub first_problem: Option<String>,
    pub close_sent: usize,
    /// Connections whose close the server answered.
    pub closed_cleanly: usize,
    pub pings: u64,
}

impl Outcome {
    /// `n` per second of the measured window.
    pub fn per_sec(&self, n: u64) -> f64 {
        per_sec(n, self.window_s)
    }

    /// Server CPU microseconds per one of `n` units of work in the window.
    pub fn server_us_per(&self, n: u64) -> Option<f64> {
        let d = self.server.as_ref()?;
        (n > 0).then(|| d.cpu_s * 1e6 / n as f64)
    }

    /// The readable summary's last lines: setup failures (`failed`
    /// labels them), the first problem, the close, the server and the
    /// client. `per` tells the server's CPU per unit of work; `who` names
    /// what was closed.
    pub fn print_tail(
        &self,
        pid: Option<u32>,
        failed: &str,
        who: &str,
        per: impl FnOnce(&Delta) -> String,
        rss_note: bool,
    ) {
        if !self.failures.is_empty() {
            println!("  {failed}{}", map_line(&self.failures));
        }
        if let Some(f) = &self.first_failure {
            println!("  first setup failure: {f}");
        }
        if let Some(p) = &self.first_problem {
            println!("  first problem: {p}");
        }
        println!(
            "  close         {} of {}{who} answered our close frame; {} pings answered",
            self.closed_cleanly, self.close_sent, self.pings
        );
        print_server(pid, self.server.as_ref(), per, rss_note);
        print_client(self.client.as_ref());
    }

    /// The JSON line: the shared fields, the errors, the server (with its
    /// CPU per unit of work, `per`) and the mode's own fields `own`.
    pub fn json(
        &self,
        mode: &str,
        url: &str,
        pid: Option<u32>,
        kinds: Kinds<'_>,
        per: &[(&str, Option<f64>)],
        own: Value,
    ) -> Value {
        let shared = json!({
            "mode": mode,
            "url": url,
            "setup_s": round(self.setup_s, 1000.0),
            "warmup_s": self.warmup.as_secs_f64(),
            "duration_s": self.duration.as_secs_f64(),
            "window_s": round(self.window_s, 1000.0),
            "errors": errors_json(kinds),
            "failures": self.failures,
            "first_failure": self.first_failure,
            "first_problem": self.first_problem,
            "close_sent": self.close_sent,
            "closed_cleanly": self.closed_cleanly,
            "pings_answered": self.pings,
            "server": server_json_per(pid, self.server.as_ref(), per),
            "client": client_json(self.client.as_ref()),
        });
        extend(shared, own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(us(1_234_567), 1234.6);
        assert_eq!(round(1.23456, 1000.0), 1.235);
        assert_eq!(per_sec(10, 0.0), 0.0);
        assert_eq!(per_sec(10, 2.0), 5.0);
        assert_eq!(dur(512_300), "512.3 µs");
        assert_eq!(dur(1_250_000), "1.25 ms");
        assert_eq!(sources_text(3), "127.0.0.1..127.0.0.3");
    }

    #[test]
    fn errors_have_a_total() {
        let v = errors_json(&[("lost", 2), ("dup", 1)]);
        assert_eq!(v, json!({"lost": 2, "dup": 1, "total": 3}));
    }
}
