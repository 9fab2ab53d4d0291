//! The load generator works end to end (a small run; figures are for the README, not
//! asserted here): against presenced and against its bare baseline server.

use std::process::Command;

fn run(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_presenced-bench"))
        .args(["run", "--clients", "60", "--watch", "2", "--changes", "4", "--rate", "20", "--settle-secs", "0", "--last-source", "4"])
        .args(extra)
        .output()
        .expect("run presenced-bench");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

#[test]
fn bench_measures_presenced_and_the_baseline() {
    for extra in [&[][..], &["--baseline"][..]] {
        let text = run(extra);
        assert!(text.contains("connected: 60/60"), "{text}");
        assert!(text.contains("KiB per connection"), "{text}");
        // 4 changes over 2 publishers, every subscriber watching both: 4 × 60 deliveries.
        let deliveries = text.lines().find(|l| l.starts_with("changes:")).unwrap_or_else(|| panic!("{text}"));
        assert!(deliveries.contains("deliveries 240 of 240 expected"), "{deliveries}");
        assert!(text.contains("fan-out time"), "{text}");
    }
}

/// The cluster benchmark brings up center + two leaves and reports its three figures;
/// every change reaches every subscriber on the other leaf, and idle heartbeats cost no
/// write (a small run; only lease renewals may write while the users idle).
#[test]
fn cluster_bench_runs_the_hub_and_spoke_topology() {
    let out = Command::new(env!("CARGO_BIN_EXE_presenced-bench"))
        .args(["cluster", "--subscribers", "5", "--publishers", "2", "--changes", "20", "--rate", "50"])
        .args(["--idle", "50", "--idle-secs", "3", "--heartbeat-secs", "1", "--lease-ttl", "60s"])
        .output()
        .expect("run presenced-bench cluster");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("100 deliveries of 100 expected"), "{text}");
    assert!(text.contains("store writes per status change: 1.000"), "{text}");
    let idle = text.lines().find(|l| l.starts_with("store writes with 50 idle users")).unwrap_or_else(|| panic!("{text}"));
    assert!(idle.contains(": 0.00 writes/s"), "{idle}");
}

/// The backends comparison runs each engine (a real nats-server and redis-server) and
/// prints the table: every change delivered, one store write per change, no store write
/// for idle heartbeats (a small run).
#[test]
fn backends_bench_compares_nats_and_redis() {
    let out = Command::new(env!("CARGO_BIN_EXE_presenced-bench"))
        .args([
            "backends",
            "--subscribers",
            "4",
            "--publishers",
            "2",
            "--changes",
            "20",
            "--rate",
            "50",
            "--writers",
            "4",
            "--write-secs",
            "1",
        ])
        .args(["--idle", "30", "--idle-secs", "2", "--heartbeat-secs", "1", "--lease-ttl", "60s"])
        .output()
        .expect("run presenced-bench backends");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for engine in ["nats", "redis"] {
        let fan = text.lines().find(|l| l.starts_with(&format!("cross-node fan-out ({engine}"))).unwrap_or_else(|| panic!("{text}"));
        assert!(fan.contains("80 deliveries of 80 expected"), "{fan}");
        let row = text.lines().find(|l| l.starts_with(&format!("| {engine} |"))).unwrap_or_else(|| panic!("{text}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[4].parse::<f64>().unwrap() > 0.0, "status writes measured: {row}");
        assert_eq!(cells[5], "1.000", "one store write per status change: {row}");
        assert!(cells[6].starts_with("0.00 (30 users)"), "idle heartbeats write nothing: {row}");
    }
}

/// The gateway-sessions benchmark registers, reads, compares liveness both ways and
/// lets the lease lapse, every session ending with its user's offline event (a small run).
#[test]
fn sessions_bench_registers_reads_and_lets_the_lease_lapse() {
    let out = Command::new(env!("CARGO_BIN_EXE_presenced-bench"))
        .args(["sessions", "--users", "2000", "--devices", "2", "--batch", "500", "--seconds", "1", "--lease-secs", "2"])
        .output()
        .expect("run presenced-bench sessions");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("registered 4000 sessions"), "{text}");
    assert!(text.contains("B per session"), "{text}");
    assert!(text.contains("GetPresence (100 ids"), "{text}");
    assert!(text.contains("per-session RefreshSession") && text.contains("instance lease:"), "{text}");
    assert!(text.contains("all 4000 sessions ended and 2000 user_offline events"), "{text}");
}

/// The event-sink benchmark delivers every event of its burst to its webhook receiver
/// and loses none (a small run).
#[test]
fn sinks_bench_delivers_every_event() {
    let out = Command::new(env!("CARGO_BIN_EXE_presenced-bench"))
        .args(["sinks", "--sessions", "500", "--batch", "50"])
        .output()
        .expect("run presenced-bench sinks");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1000 events produced") && text.contains("1000 delivered"), "{text}");
    assert!(text.contains("dropped 0"), "{text}");
}

/// Runs `presenced-bench scale` with `args`; its report, which must say it succeeded.
fn scale(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_presenced-bench")).arg("scale").args(args).output().expect("run presenced-bench scale");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The report's line starting with `prefix`.
fn report_line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
}

/// Changes delivered to contacts, from the "change -> contact" line.
fn deliveries(text: &str) -> u64 {
    report_line(text, "change -> contact").split_whitespace().nth(3).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Heartbeats sent during the hold and acks received, from the "heartbeats" line; at
/// least one was sent, and (but for those in flight at the end) each was answered.
fn heartbeats_answered(text: &str) -> u64 {
    let line = report_line(text, "heartbeats");
    let n: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(n.len() == 2 && n[0] > 0 && n[1] * 10 >= n[0] * 9, "{line}");
    n[1]
}

/// Short hold with many changes and quick heartbeats: the miniature's load.
const HOLD: [&str; 8] = ["--hold-secs", "4", "--change-pct-per-min", "300", "--heartbeat-secs", "2", "--concurrency", "32"];

/// `scale` in miniature: three presenced nodes on a real nats-server, three generator
/// processes, every session up, contacts on other nodes told of changes, the nats-server's
/// subscriptions counted, heartbeats answered, CPU reported, the engine reniced and its log
/// summarized; and its bare baseline, whose
/// nodes answer the same heartbeats with the same ack.
#[test]
fn scale_bench_runs_nodes_and_generators() {
    let small = ["--nodes", "3", "--sessions", "1500", "--per-generator", "500", "--contacts", "4", "--no-sysctl"];
    let engine = ["--node-env", "PRESENCE_CACHE__WATCH_WRITES=false", "--engine-nice", "1"];
    let text = scale(&[&small[..], &HOLD[..], &engine[..]].concat());
    assert!(text.contains("sessions held        1500 of 1500 (0 failed;"), "{text}");
    assert!(text.contains("nats-servers reniced to 1"), "{text}");
    assert!(report_line(&text, "nats-server log").ends_with("warnings and errors over the run"), "{text}");
    assert!(text.contains("node configuration   PRESENCE_CACHE__WATCH_WRITES=false"), "{text}");
    assert!(deliveries(&text) > 0, "{text}");
    let subs = report_line(&text, "nats-server          ");
    assert!(subs.contains(" subscriptions") && !subs.contains(" 0 subscriptions"), "{subs}");
    assert!(report_line(&text, "change -> contact").contains("(0 refused by the nodes)"), "{text}");
    let engine = report_line(&text, "nats-server CPU");
    assert!(engine.contains("s per second during the hold; 0 of 3 nodes degraded at its end"), "{engine}");
    heartbeats_answered(&text);
    assert!(report_line(&text, "machine CPU").contains("% busy during the hold"), "{text}");
    let text = scale(&[&small[..], &HOLD[..], &["--baseline"]].concat());
    assert!(text.contains("sessions held        1500 of 1500 (0 failed;"), "{text}");
    heartbeats_answered(&text);
}

/// `scale --leaves 2`: the seed's hub and spoke in miniature: a center nats-server with the
/// KV and two leaf nats-servers, three leaf nodes (two on leaf 0, one on leaf 1), so a
/// contact's change crosses leaf → center → leaf; every session up, changes delivered,
/// the bare baseline published on one leaf and received on the other.
#[test]
fn scale_bench_runs_the_hub_and_spoke_layout() {
    let layout = ["--nodes", "3", "--leaves", "2", "--sessions", "900", "--per-generator", "300", "--contacts", "4", "--no-sysctl"];
    let text = scale(&[&layout[..], &HOLD[..]].concat());
    assert!(text.contains("layout               hub and spoke: a center nats-server (JetStream domain hub) and 2 leaf"), "{text}");
    assert!(text.contains("sessions held        900 of 900 (0 failed;"), "{text}");
    assert!(deliveries(&text) > 0, "{text}");
    let subs = report_line(&text, "nats-server          ");
    assert!(subs.contains("(center and 2 leaves summed)") && !subs.contains(" 0 subscriptions"), "{subs}");
    assert!(!report_line(&text, "bare NATS pub->sub").contains(" 0 messages"), "{text}");
}

/// `presenced-bench chaos`, small: what watchers (WebSocket and gRPC) were shown and what
/// every node reads, against what the clients lived, through a rolling restart, a flaky
/// network, a `kill -9` and a partition longer than the node lease, on one engine. With
/// the grace: no false offline, no false online, no duplicate, no departure left shown
/// online past its grace (and a second), every node reading the truth at the end. The
/// `0s` baseline of the same rolling restart and flaky network shows the flaps the grace
/// removes, so the checker is seen to catch them.
fn chaos(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run = |scenarios: &str, baseline: bool, file: &str| -> Vec<serde_json::Value> {
        let json = dir.path().join(file);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_presenced-bench"));
        cmd.args(["chaos", "--engine", engine, "--scenario", scenarios, "--clients", "300", "--grace-secs", "3", "--lease-secs", "2"])
            .args(["--session-ttl-secs", "8", "--heartbeat-secs", "3", "--flaky-secs", "8", "--drop-rate", "0.05", "--leavers", "0.06"])
            .arg("--json")
            .arg(&json);
        if !baseline {
            cmd.arg("--no-baseline");
        }
        let out = cmd.output().expect("run presenced-bench chaos");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
    };
    let mut reports = run("rolling,flaky", true, "a.json");
    reports.extend(run("kill,partition", false, "b.json"));
    assert_eq!(reports.len(), 6, "{reports:?}");
    for r in &reports {
        let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        if r["grace_secs"] == 0 {
            assert!(n("false_offline") > 0.0, "the baseline flaps, and the checker sees it: {r}");
            continue;
        }
        assert!(n("reconnects") > 0.0 && n("departures") > 0.0, "{r}");
        for k in ["false_offline", "false_online", "duplicates", "read_mismatches", "undetected_departures"] {
            assert_eq!(n(k), 0.0, "{k}: {r}");
        }
        assert!(n("zombie_seconds") <= n("departures"), "departures shown online past the grace: {r}");
        if r["scenario"] == "partition" {
            assert!(r["converge_ms"].is_u64(), "every node reads the truth after the heal: {r}");
        }
    }
}

#[test]
fn chaos_on_nats_shows_no_lie() {
    chaos("nats");
}

#[test]
fn chaos_on_redis_shows_no_lie() {
    chaos("redis");
}
