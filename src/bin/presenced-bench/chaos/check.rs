//! The checker: what watchers were shown and what nodes read, against what the clients
//! lived.

use super::*;

/// A time a user was not connected: `start` (the socket's end, or its last frame for a
/// silent device) to `end` (its next `connected`; `None`: never came back).
#[derive(Debug, Clone, Copy)]
pub(super) struct Gap {
    pub(super) start: i64,
    pub(super) end: Option<i64>,
    pub(super) silent: bool,
}

pub(super) fn gaps(t: &Truth) -> Vec<Gap> {
    let mut out = Vec::new();
    for w in t.intervals.windows(2) {
        if let (Some(to), (from, _, _)) = (w[0].1, w[1]) {
            out.push(Gap { start: to, end: Some(from), silent: false });
        }
    }
    if let Some((at, silent)) = t.left {
        out.push(Gap { start: at, end: None, silent });
    }
    out
}

pub(super) struct Check<'a> {
    pub(super) truths: &'a [Truth],
    pub(super) logs: &'a [Watched],
    /// What counts as a real departure: away longer than this (the run's grace, also for
    /// its `0s` baseline: a shorter absence shown offline is the flap users see).
    pub(super) reference_grace_ms: i64,
    /// The grace the nodes ran with.
    pub(super) run_grace_ms: i64,
    pub(super) session_ttl_ms: i64,
    pub(super) start: i64,
    pub(super) end: i64,
    /// A partition: (cut, healed, node).
    pub(super) cut: Option<(i64, i64, usize)>,
}

/// Slack for delivery: an offline of a departure may arrive this long after the client
/// came back, and a departure shows this long after its deadline without being a zombie.
pub(super) const SLACK_MS: i64 = 2_000;

impl Check<'_> {
    pub(super) fn long(&self, g: &Gap) -> bool {
        g.end.is_none_or(|e| e - g.start > self.reference_grace_ms)
    }

    /// The node `user` was connected to at `at`, if it was.
    pub(super) fn connected_to(&self, user: usize, at: i64) -> Option<usize> {
        self.truths[user].intervals.iter().find(|(f, t, _)| *f <= at && t.is_none_or(|t| at <= t)).map(|(_, _, n)| *n)
    }

    /// Whether what log on `node` showed of `user` at `at` is stale by the partition:
    /// the log is on the cut node, or the user was connected to it, during the cut (and
    /// a few seconds after the heal, the time a write-back takes to show).
    pub(super) fn partitioned(&self, node: usize, user: usize, at: i64) -> bool {
        self.cut.is_some_and(|(from, to, cut_node)| {
            at >= from && at <= to + 5_000 && (node == cut_node || self.connected_to(user, at.min(to)) == Some(cut_node))
        })
    }

    pub(super) fn report(&self) -> Report {
        let all_gaps: Vec<Vec<Gap>> = self.truths.iter().map(gaps).collect();
        let reconnects = all_gaps.iter().flatten().filter(|g| g.end.is_some()).count();
        let departures: Vec<(usize, Gap)> =
            all_gaps.iter().enumerate().flat_map(|(u, gs)| gs.iter().filter(|g| g.end.is_none()).map(move |g| (u, *g))).collect();
        let (mut false_offline, mut cut_off, mut false_online, mut duplicates) = (0, 0, 0, 0);
        let mut duplicate_details = Vec::new();
        let mut observations = 0;
        for log in self.logs {
            let node = &log.node;
            observations += log.seen.len();
            let mut last: HashMap<usize, (bool, i64)> = HashMap::new();
            let mut conn = usize::MAX;
            for s in log.seen.iter().filter(|s| s.at >= self.start) {
                if s.conn != conn {
                    // A new connection of the watcher: what it knew before is stale.
                    conn = s.conn;
                    last.clear();
                }
                let (prev, prev_at) = last.insert(s.user, (s.online, s.at)).map_or((None, None), |(o, at)| (Some(o), Some(at)));
                if s.snapshot {
                    // A snapshot after a watcher (re)subscribed: compared with the
                    // truth, not counted as a repeat.
                    if prev == Some(s.online) || prev.is_none() {
                        continue;
                    }
                } else if prev == Some(s.online) {
                    duplicates += 1;
                    if duplicate_details.len() < 10 {
                        let rel = |t: i64| t - self.start;
                        let cut = self
                            .cut
                            .map_or(String::new(), |(f, t, n)| format!(" (node {n} cut at +{} ms, healed at +{} ms)", rel(f), rel(t)));
                        duplicate_details.push(format!(
                            "node {node}: user {} shown {} again at +{} ms (before at +{} ms){cut}",
                            s.user,
                            if s.online { "online" } else { "offline" },
                            rel(s.at),
                            prev_at.map_or(0, rel),
                        ));
                    }
                    continue;
                }
                let justified =
                    all_gaps[s.user].iter().any(|g| self.long(g) && g.start <= s.at && g.end.is_none_or(|e| s.at <= e + SLACK_MS));
                if !s.online && prev != Some(false) && !justified {
                    if self.partitioned(*node, s.user, s.at) {
                        cut_off += 1;
                    } else {
                        false_offline += 1;
                    }
                }
                if s.online && prev == Some(false) {
                    // Shown back online: wrong if the user was away (a long gap) then,
                    // past the time its departure may take to show (the grace, or the
                    // TTL of a silent device), and no delivery was on its way.
                    let gone = all_gaps[s.user].iter().any(|g| {
                        let shows = if g.silent { self.session_ttl_ms } else { self.run_grace_ms };
                        self.long(g) && s.at > g.start + shows + SLACK_MS && g.end.is_none_or(|e| s.at + SLACK_MS < e)
                    });
                    if gone && !self.partitioned(*node, s.user, s.at) {
                        false_online += 1;
                    }
                }
            }
        }
        // Departures: when did each show as offline? A log's first offline push after it
        // left times it (a snapshot after the watcher reconnected only bounds it); a log
        // connected when it was due and still showing it online counts zombie time.
        let (mut closed, mut silent, mut zombie_ms, mut undetected) = (Vec::new(), Vec::new(), 0i64, 0usize);
        for (u, g) in &departures {
            let due = g.start + if g.silent { self.session_ttl_ms } else { self.run_grace_ms } + 1_000;
            let mut pushed: Vec<i64> = Vec::new();
            let (mut worst_zombie, mut shown, mut measured) = (0, false, false);
            for log in self.logs {
                if self.partitioned(log.node, *u, due) {
                    continue; // a cut-off node's view, or of a cut-off node's user: stale by the partition
                }
                let mine: Vec<&Seen> = log.seen.iter().filter(|s| s.user == *u).collect();
                if mine.iter().rev().find(|s| s.at < g.start).is_none_or(|s| !s.online) {
                    continue; // nothing seen before it left, or already shown offline
                }
                measured = true;
                let after: Vec<&&Seen> = mine.iter().filter(|s| s.at >= g.start && !s.online).collect();
                shown |= !after.is_empty();
                if let Some(s) = after.iter().find(|s| !s.snapshot) {
                    pushed.push(s.at);
                }
                // Zombie time: the connection up at `due`, if it showed the user online then.
                if let Some(ci) = log.conns.iter().position(|(f, t)| *f <= due && t.is_none_or(|t| t > due)) {
                    let until = log.conns[ci].1.unwrap_or(self.end);
                    let at_due = mine.iter().rev().find(|s| s.conn == ci && s.at <= due);
                    if at_due.is_some_and(|s| s.online) {
                        let off = mine.iter().find(|s| s.conn == ci && s.at > due && !s.online).map_or(until, |s| s.at.min(until));
                        worst_zombie = worst_zombie.max(off - due);
                    }
                }
            }
            zombie_ms += worst_zombie.max(0);
            if worst_zombie > 0 && std::env::var_os("CHAOS_DEBUG").is_some() {
                eprintln!("zombie {worst_zombie} ms: u{u} {g:?} due {due} truth {:?}", self.truths[*u]);
                for log in self.logs {
                    let mine: Vec<(i64, bool, bool, usize)> =
                        log.seen.iter().filter(|s| s.user == *u).map(|s| (s.at, s.online, s.snapshot, s.conn)).collect();
                    eprintln!("  log on n{}: conns {:?} seen {mine:?}", log.node, log.conns);
                }
            }
            if !measured {
                continue; // no watcher could tell (all cut off)
            }
            if !shown {
                if std::env::var_os("CHAOS_DEBUG").is_some() {
                    eprintln!("undetected: u{u} {g:?} truth {:?} cut {:?}", self.truths[*u], self.cut);
                    for log in self.logs {
                        let mine: Vec<(i64, bool, bool, usize)> =
                            log.seen.iter().filter(|s| s.user == *u).map(|s| (s.at, s.online, s.snapshot, s.conn)).collect();
                        eprintln!("  log on n{}: conns {:?} seen {mine:?}", log.node, log.conns);
                    }
                }
                undetected += 1;
                continue;
            }
            if pushed.is_empty() {
                continue; // shown, but only in snapshots: no time to tell
            }
            pushed.sort_unstable();
            let latency = pushed[pushed.len() / 2] - g.start;
            if g.silent {
                silent.push(latency);
            } else {
                closed.push(latency);
            }
        }
        closed.sort_unstable();
        silent.sort_unstable();
        let p = |v: &[i64], q: f64| if v.is_empty() { 0 } else { v[((v.len() - 1) as f64 * q).round() as usize] };
        Report {
            engine: String::new(),
            scenario: String::new(),
            grace_secs: 0,
            clients: self.truths.len(),
            reconnects,
            departures: departures.len(),
            false_offline,
            false_offline_per_1000_reconnects: if reconnects == 0 { 0.0 } else { false_offline as f64 * 1000.0 / reconnects as f64 },
            cut_off_offline: cut_off,
            false_online,
            duplicates,
            zombie_seconds: zombie_ms as f64 / 1000.0,
            detection_closed_p50_ms: p(&closed, 0.5),
            detection_closed_p99_ms: p(&closed, 0.99),
            detection_silent_p50_ms: p(&silent, 0.5),
            detection_silent_p99_ms: p(&silent, 0.99),
            undetected_departures: undetected,
            converge_ms: None,
            read_mismatches: 0,
            mismatch_details: Vec::new(),
            duplicate_details,
            observations,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<'a>(truths: &'a [Truth], logs: &'a [Watched]) -> Report {
        Check { truths, logs, reference_grace_ms: 10_000, run_grace_ms: 10_000, session_ttl_ms: 20_000, start: 0, end: 100_000, cut: None }
            .report()
    }

    fn seen(at: i64, online: bool) -> Seen {
        Seen { at, user: 0, online, snapshot: false, conn: 0 }
    }

    fn log(seen: Vec<Seen>) -> Vec<Watched> {
        vec![Watched { node: 2, seen, conns: vec![(0, None)] }]
    }

    #[test]
    fn an_offline_during_a_short_reconnect_is_a_flap_and_a_real_departure_is_not() {
        // Connected 0-10 s, back at 11 s (a reload), gone for good at 30 s.
        let t = Truth { intervals: vec![(0, Some(10_000), 0), (11_000, Some(30_000), 1)], left: Some((30_000, false)) };
        let logs = log(vec![seen(0, true), seen(10_100, false), seen(11_100, true), seen(40_500, false)]);
        let r = check(std::slice::from_ref(&t), &logs);
        assert_eq!((r.reconnects, r.departures, r.false_offline, r.duplicates), (1, 1, 1, 0));
        assert_eq!((r.detection_closed_p50_ms, r.zombie_seconds), (10_500, 0.0));
        // Shown offline late: zombie-seconds past the grace and a second.
        let logs = log(vec![seen(0, true), seen(45_000, false), seen(46_000, false)]);
        let r = check(std::slice::from_ref(&t), &logs);
        assert_eq!((r.false_offline, r.duplicates, r.zombie_seconds), (0, 1, 4.0));
        // Announced online again while gone.
        let logs = log(vec![seen(0, true), seen(40_500, false), seen(50_000, true)]);
        assert_eq!(check(std::slice::from_ref(&t), &logs).false_online, 1);
    }
}
