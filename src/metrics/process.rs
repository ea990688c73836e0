//! The standard `process_*` metrics, read from `/proc/self` at each scrape.
//!
//! Same names, units and sources as the Prometheus client libraries: resident and virtual
//! memory, CPU seconds (user + system), open and maximum file descriptors, start time in
//! Unix seconds. A figure whose file cannot be read or parsed is left out of the scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second in `/proc/<pid>/stat`: Linux reports times in USER_HZ, which is
/// 100 on every architecture this agent is built for (what `sysconf(_SC_CLK_TCK)` returns).
const TICKS_PER_SECOND: f64 = 100.0;

/// The figures of one scrape; `None` for what could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ProcessFigures {
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Registered once with the registry; reads `/proc/self` whenever the registry is encoded.
#[derive(Debug)]
pub(crate) struct ProcessCollector {
    /// Constant for the life of the process, so read once.
    start_time_seconds: Option<f64>,
}

impl ProcessCollector {
    pub(crate) fn new() -> ProcessCollector {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let boot = std::fs::read_to_string("/proc/stat").ok();
        let start_time_seconds = match (stat, boot) {
            (Some(stat), Some(boot)) => start_time(&stat, &boot),
            _ => None,
        };
        ProcessCollector { start_time_seconds }
    }

    pub(crate) fn figures(&self) -> ProcessFigures {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        ProcessFigures {
            resident_bytes: read("/proc/self/status").and_then(|s| resident_bytes(&s)),
            virtual_bytes: stat.map(|s| s.vsize),
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / TICKS_PER_SECOND),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: read("/proc/self/limits").and_then(|s| max_open_files(&s)),
            start_time_seconds: self.start_time_seconds,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = self.figures();
        if let Some(cpu) = f.cpu_seconds {
            let counter = ConstCounter::new(cpu);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        let whole: [(&str, &str, Option<u64>); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                f.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                f.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                f.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit).",
                f.max_fds,
            ),
        ];
        for (name, help, value) in whole {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        if let Some(start) = f.start_time_seconds {
            let gauge = ConstGauge::new(start);
            let metric = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stat {
    pub utime: u64,
    pub stime: u64,
    pub starttime: u64,
    pub vsize: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state): field N is fields[N - 3].
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        vsize: field(23)?,
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes.
pub(crate) fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// The soft limit on the "Max open files" line of `/proc/<pid>/limits`; `None` when
/// unlimited.
pub(crate) fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Start time in Unix seconds: the boot time (`btime` of `/proc/stat`) plus the process's
/// start in ticks after boot (field 22 of its stat).
pub(crate) fn start_time(stat: &str, proc_stat: &str) -> Option<f64> {
    let starttime = parse_stat(stat)?.starttime;
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime as f64 + starttime as f64 / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "5970 (a) b) c) R 5968 5968 12828 0 -1 4194304 99 0 0 0 250 70 0 0 20 0 1 0 264991 3133440 410 18446744073709551615 1 2 3";

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = parse_stat(STAT).expect("parses");
        assert_eq!(
            stat,
            Stat {
                utime: 250,
                stime: 70,
                starttime: 264991,
                vsize: 3133440
            }
        );
        assert_eq!(parse_stat("12 (x) R 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn start_time_is_boot_time_plus_ticks() {
        let t = start_time(STAT, "cpu 1 2 3\nbtime 1700000000\nprocesses 9\n");
        assert_eq!(t, Some(1_700_000_000.0 + 2649.91));
        assert_eq!(start_time(STAT, "cpu 1 2 3\n"), None);
    }

    #[test]
    fn rss_is_read_in_kib_and_max_fds_as_the_soft_limit() {
        assert_eq!(
            resident_bytes("Name:\tx\nVmRSS:\t    1234 kB\n"),
            Some(1234 * 1024)
        );
        assert_eq!(resident_bytes("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_open_files(unlimited), None);
    }

    #[test]
    fn this_process_figures_are_plausible() {
        let f = ProcessCollector::new().figures();
        assert!(f.resident_bytes.is_some_and(|v| v > 0), "{f:?}");
        assert!(
            f.virtual_bytes
                .is_some_and(|v| v >= f.resident_bytes.unwrap_or(0)),
            "{f:?}"
        );
        assert!(f.open_fds.is_some_and(|v| v >= 3), "{f:?}");
        assert!(
            f.max_fds.is_some_and(|v| v >= f.open_fds.unwrap_or(0)),
            "{f:?}"
        );
        assert!(f.cpu_seconds.is_some_and(|v| v >= 0.0), "{f:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        let start = f.start_time_seconds.expect("start time");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }
}
