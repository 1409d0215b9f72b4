//! CPU time and resident memory of a process, from /proc.

use std::time::Instant;

/// Linux reports utime/stime in /proc/PID/stat in USER_HZ ticks, which the
/// kernel fixes at 100 for user space on every architecture (independent of
/// CONFIG_HZ); hard-coded to keep this binary free of `unsafe` sysconf calls.
const USER_HZ: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// VmRSS: user-space resident memory (socket buffers are kernel memory, not in it).
    pub rss_bytes: u64,
}

/// Read `/proc/<pid>/stat` and `/proc/<pid>/status` (`pid` "self" for this process).
pub fn sample(pid: &str) -> Result<Sample, String> {
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let ticks =
        parse_cpu_ticks(&stat).ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let rss = parse_rss(&status).ok_or_else(|| format!("/proc/{pid}/status: no VmRSS"))?;
    Ok(Sample {
        at,
        cpu_s: ticks as f64 / USER_HZ,
        rss_bytes: rss,
    })
}

/// utime (field 14) + stime (field 15). The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so fields are
/// counted from the last ')'.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    // The first field after ')' is field 3 (state): utime is 11 further on.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:    1234 kB` in bytes.
pub fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_ascii_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(n * 1024),
        Some(_) => None,
    }
}

/// What happened between two samples.
#[derive(Debug, Clone, Copy)]
pub struct Delta {
    pub cpu_s: f64,
    pub wall_s: f64,
    pub rss_before: u64,
    pub rss_after: u64,
}

impl Delta {
    pub fn between(a: &Sample, b: &Sample) -> Delta {
        Delta {
            cpu_s: (b.cpu_s - a.cpu_s).max(0.0),
            wall_s: b.at.saturating_duration_since(a.at).as_secs_f64(),
            rss_before: a.rss_bytes,
            rss_after: b.rss_bytes,
        }
    }

    /// CPU used as a fraction of one core.
    pub fn cores(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.cpu_s / self.wall_s
        } else {
            0.0
        }
    }
}

/// Bytes in a readable unit.
pub fn human_bytes(b: f64) -> String {
    let a = b.abs();
    if a >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if a >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if a >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_counted_from_the_last_paren() {
        let stat = "4242 (shard (1) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 5 0 100 1000000 300 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_in_bytes() {
        let status = "Name:\tswitchboard\nVmPeak:\t  9999 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss(status), Some(5120 * 1024));
        assert_eq!(parse_rss("Name: x\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let s = sample("self").unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_s >= 0.0);
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
    }
}
