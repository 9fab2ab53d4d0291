//! Host tuning for a scale run: its own network namespace, sysctls raised and restored,
//! the generators' priority, and the guard that stops a ramp before the machine runs out
//! of memory or sockets.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cpu::MachineCpu;
use crate::{rss_kib, Res};

/// Set in the bench's own process once it runs in its own network namespace.
pub(super) const IN_NETNS: &str = "PRESENCED_BENCH_IN_NETNS";

/// Runs this same command again in a new network namespace (its loopback up) whose TCP
/// hash has `buckets` buckets; the sysctl is set for the namespace's creation and restored.
pub(super) fn in_own_netns(buckets: u64) -> Res<()> {
    let key = "net.ipv4.tcp_child_ehash_entries";
    let want = buckets.to_string();
    let restore = raise(key, &want, |v| v.parse::<u64>().is_ok_and(|n| n != buckets));
    let now = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_child_ehash_entries").unwrap_or_default();
    if now.trim() != want {
        return Err(format!("{key} is {:?}, not {want}: --netns-ehash needs root and Linux 6.1 or later", now.trim()));
    }
    println!("netns: a network namespace of its own, {buckets} TCP hash buckets");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let status = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(IN_NETNS, "1")
        .status()
        .map_err(|e| format!("unshare (util-linux): {e}"))?;
    drop(restore);
    if status.success() {
        Ok(())
    } else {
        Err(format!("the bench in its own network namespace: {status}"))
    }
}

/// A sysctl the bench changed, restored on drop.
pub(super) struct Sysctl {
    key: &'static str,
    old: String,
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let path = format!("/proc/sys/{}", self.key.replace('.', "/"));
        match std::fs::write(&path, &self.old) {
            Ok(()) => println!("sysctl {} restored to {:?}", self.key, self.old.trim()),
            Err(e) => println!("sysctl {}: could not restore {:?}: {e}", self.key, self.old.trim()),
        }
    }
}

/// Sets `key` to `want` when the current value is smaller (per `smaller`), reporting it.
pub(super) fn raise(key: &'static str, want: &str, smaller: impl Fn(&str) -> bool) -> Option<Sysctl> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let old = std::fs::read_to_string(&path).ok()?;
    if !smaller(old.trim()) {
        return None;
    }
    match std::fs::write(&path, want) {
        Ok(()) => {
            println!("sysctl {key}: {:?} -> {want:?} (restored at the end)", old.trim());
            Some(Sysctl { key, old })
        }
        Err(e) => {
            println!("sysctl {key} is {:?}; could not set {want:?} ({e}): run as root, or set it yourself", old.trim());
            None
        }
    }
}

/// What is left of a ramp allowed `limit_secs` from `t0` (at least a second, for the
/// answers already waiting).
pub(super) fn ramp_left(t0: Instant, limit_secs: u64) -> Duration {
    Duration::from_secs(limit_secs).saturating_sub(t0.elapsed()).max(Duration::from_secs(1))
}

/// Sets a process's nice value with `renice` (util-linux), or says why it could not.
pub(super) fn renice(pid: u32, nice: i32) -> Res<()> {
    let out = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
        .output()
        .map_err(|e| format!("--engine-nice: cannot run renice: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("--engine-nice {nice}: renice failed (below 0 needs root): {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Watches the machine while the sessions ramp up: prints where the memory is every 15 s
/// and, when MemAvailable falls below the floor, kills the generators (their sessions end
/// with them) and keeps that breakdown: what ran out first, measured rather than guessed.
pub(super) struct RampGuard {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tripped: Arc<parking_lot::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub(super) fn meminfo_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// (TCP sockets in use, pages of TCP buffer memory) from /proc/net/sockstat.
pub(super) fn tcp_sockstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("TCP:")) else { return (0, 0) };
    let f: Vec<&str> = line.split_whitespace().collect();
    let field = |k: &str| f.iter().position(|x| *x == k).and_then(|i| f.get(i + 1)?.parse().ok()).unwrap_or(0);
    (field("inuse"), field("mem"))
}

impl RampGuard {
    pub(super) fn start(min_free_mib: u64, nodes: Vec<u32>, gens: Vec<u32>, nats: Vec<u32>) -> RampGuard {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tripped = Arc::new(parking_lot::Mutex::new(None));
        let (st, tr) = (stop.clone(), tripped.clone());
        let (tcp0, slab0) = (tcp_sockstat().0, meminfo_kib("Slab:"));
        let thread = std::thread::spawn(move || {
            let gib = |kib: u64| kib as f64 / (1024.0 * 1024.0);
            let sum = |pids: &[u32]| pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>();
            let start = Instant::now();
            let mut last = start;
            let mut cpu_then = MachineCpu::now();
            while !st.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let avail = meminfo_kib("MemAvailable:");
                let low = avail < min_free_mib * 1024;
                if !low && last.elapsed() < Duration::from_secs(15) {
                    continue;
                }
                last = Instant::now();
                let cpu_now = MachineCpu::now();
                let (busy, _, system, softirq) = cpu_now.since(&cpu_then);
                cpu_then = cpu_now;
                let (tcp, tcp_pages) = tcp_sockstat();
                let line = format!(
                    "{:.0} s, ~{} sessions: nodes {:.2} GiB, generators {:.2} GiB, nats-server {:.2} GiB, kernel slab +{:.2} GiB, TCP buffers {:.2} GiB; {:.2} GiB available; CPU {:.0} % busy (system {:.0} %, softirq {:.0} %)",
                    start.elapsed().as_secs_f64(),
                    tcp.saturating_sub(tcp0) / 2,
                    gib(sum(&nodes)),
                    gib(sum(&gens)),
                    gib(sum(&nats)),
                    gib(meminfo_kib("Slab:").saturating_sub(slab0)),
                    gib(tcp_pages * 4),
                    gib(avail),
                    busy,
                    system,
                    softirq,
                );
                println!("ramp: {line}");
                if low {
                    *tr.lock() = Some(format!("MemAvailable under {min_free_mib} MiB at {line}"));
                    for p in &gens {
                        let _ = Command::new("kill").args(["-s", "KILL", &p.to_string()]).status();
                    }
                    return;
                }
            }
        });
        RampGuard { stop, tripped, thread: Some(thread) }
    }

    pub(super) fn tripped(&self) -> Option<String> {
        self.tripped.lock().clone()
    }
}

impl Drop for RampGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
