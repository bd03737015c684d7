//! What benchmarks and probes read about a process from /proc: its memory
//! (`status`) and the BPF objects it holds (`fdinfo`), with the kernel's BPF
//! run-time statistics switched on while they are wanted.

use std::os::fd::OwnedFd;

/// A `kB` field of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`, `RssAnon:`…).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A numeric field (`map_id:`, `memlock:`…) of one fdinfo text.
pub fn fdinfo_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

/// Turns on the kernel's BPF run-time statistics (what
/// `sysctl kernel.bpf_stats_enabled=1` does) while the returned fd is open.
pub fn enable_run_time_stats() -> std::io::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| e.io_error)
}

/// (run_time_ns, run_cnt) summed over the BPF programs process `pid` holds;
/// `None` when it holds none.
pub fn prog_stats(pid: u32) -> Option<(u64, u64)> {
    let mut found = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        if let (Some(t), Some(c)) = (
            fdinfo_field(&info, "run_time_ns:"),
            fdinfo_field(&info, "run_cnt:"),
        ) {
            let (st, sc) = found.unwrap_or((0, 0));
            found = Some((st + t, sc + c));
        }
    }
    found
}
