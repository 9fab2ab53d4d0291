//! CPU accounting of the bench: a process's CPU time, and the machine's.

/// CPU seconds (user + system) a process used so far; `None` once it is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = s.get(s.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The machine's CPU time so far, from /proc/stat's `cpu` line (in ticks): user (with
/// nice), system, softirq (with irq), idle (with iowait), steal.
#[derive(Debug, Default, Clone, Copy)]
pub struct MachineCpu {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
    pub idle: u64,
    pub steal: u64,
}

impl MachineCpu {
    pub fn now() -> MachineCpu {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> = s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        MachineCpu { user: at(0) + at(1), system: at(2), idle: at(3) + at(4), softirq: at(5) + at(6), steal: at(7) }
    }

    /// CPU-seconds (all CPUs) between `before` and now.
    pub fn elapsed_secs(&self, before: &MachineCpu) -> f64 {
        let total = |c: &MachineCpu| c.user + c.system + c.softirq + c.idle + c.steal;
        total(self).saturating_sub(total(before)) as f64 / 100.0
    }

    /// Shares of the time since `before`, in percent: (busy, user, system, softirq).
    pub fn since(&self, before: &MachineCpu) -> (f64, f64, f64, f64) {
        let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
        let (u, sy, si) = (d(self.user, before.user), d(self.system, before.system), d(self.softirq, before.softirq));
        let total = (u + sy + si + d(self.idle, before.idle) + d(self.steal, before.steal)).max(1.0);
        let pct = |x: f64| 100.0 * x / total;
        (pct(u + sy + si), pct(u), pct(sy), pct(si))
    }
}
