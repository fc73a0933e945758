//! What /proc says about the processes a benchmark runs: which `ukvmi
//! daemon` serves a socket, the CPU time and wake-ups of each thread, the
//! load average and the host's steal time.

use std::path::Path;

/// The pids of the `ukvmi daemon` processes serving `sock`.
pub fn daemon_pids(sock: &Path) -> Vec<u32> {
    let want = sock.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let c = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = c.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        (args.get(1).is_some_and(|a| a == "daemon") && args.contains(&want)).then_some(pid)
    })
    .collect()
}

/// Per thread of process `pid`: its name, CPU time (ns, from `schedstat`)
/// and how often it went to sleep (voluntary context switches: wake-ups).
pub fn thread_cpu(pid: u32) -> Vec<(String, u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| {
        let path = e.ok()?.path();
        let name = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_owned();
        let sched = std::fs::read_to_string(path.join("schedstat")).ok()?;
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        let sleeps = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?.trim().parse().ok()?;
        Some((name, sched.split(' ').next()?.parse().ok()?, sleeps))
    })
    .collect()
}

/// The host's CPU time so far (all CPUs, clock ticks): (total, steal).
/// Steal is time the hypervisor below gave to someone else.
pub fn cpu_steal() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return (0, 0) };
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    (f.iter().take(8).sum(), f.get(7).copied().unwrap_or(0))
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|e| format!("? ({e})"), |s| s.trim().to_owned())
}
