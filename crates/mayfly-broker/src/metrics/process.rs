//! The process's own metrics, named as every Prometheus client library
//! names them (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc/self` at each scrape.
//! Only this process's own directory is read, which a unit with
//! `ProcSubset=pid` still shows; where there is no `/proc` (not Linux) the
//! readings are simply absent.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// The kernel's fixed unit of `/proc/<pid>/stat` times (`USER_HZ`), 100 on
/// every Linux ABI.
const USER_HZ: f64 = 100.0;

/// See the module docs.
#[derive(Debug)]
pub struct ProcessCollector {
    /// When the broker's metrics were made: its start, to the second.
    started: f64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self { started }
    }
}

/// One reading of `/proc/self`; a field is `None` where it could not be read.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl Reading {
    fn now() -> Self {
        let read = |f: &str| std::fs::read_to_string(format!("/proc/self/{f}")).ok();
        let status = read("status");
        Self {
            cpu_seconds: read("stat").as_deref().and_then(cpu_seconds),
            resident_bytes: status.as_deref().and_then(|s| status_kib(s, "VmRSS:")),
            virtual_bytes: status.as_deref().and_then(|s| status_kib(s, "VmSize:")),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .and_then(|d| i64::try_from(d.count()).ok()),
            max_fds: read("limits").as_deref().and_then(max_open_files),
        }
    }
}

/// User plus system time from `/proc/self/stat` (fields 14 and 15, counted
/// after the parenthesised command name, which may hold spaces).
fn cpu_seconds(stat: &str) -> Option<f64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A `kB` line of `/proc/self/status`, in bytes.
fn status_kib(status: &str, key: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: i64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The soft limit on open files from `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Option<impl Into<f64>>,
) -> Result<(), std::fmt::Error> {
    if let Some(v) = value {
        let g = ConstGauge::new(v.into());
        g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)?;
    }
    Ok(())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = Reading::now();
        if let Some(cpu) = r.cpu_seconds {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        #[allow(clippy::cast_precision_loss)] // memory sizes far below 2^53
        let f = |v: Option<i64>| v.map(|n| n as f64);
        gauge(
            &mut encoder,
            "process_resident_memory",
            "Resident memory size in bytes",
            Some(&Unit::Bytes),
            f(r.resident_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory",
            "Virtual memory size in bytes",
            Some(&Unit::Bytes),
            f(r.virtual_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors",
            None,
            f(r.open_fds),
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors",
            None,
            f(r.max_fds),
        )?;
        gauge(
            &mut encoder,
            "process_start_time",
            "Start time of the process since the Unix epoch in seconds",
            Some(&Unit::Seconds),
            Some(self.started),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_files() {
        // A command name with spaces and parentheses does not shift fields.
        let stat =
            "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 99";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        let status = "Name:\tmayfly\nVmSize:\t  2048 kB\nVmRSS:\t    512 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(512 * 1024));
        assert_eq!(status_kib(status, "VmSize:"), Some(2048 * 1024));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn this_process_is_read_on_linux() {
        let r = Reading::now();
        if cfg!(target_os = "linux") {
            assert!(r.cpu_seconds.is_some_and(|c| c >= 0.0));
            assert!(r.resident_bytes.is_some_and(|b| b > 0));
            assert!(r.open_fds.is_some_and(|n| n > 0));
            assert!(r.max_fds.is_some_and(|n| n > 0));
        }
    }
}
