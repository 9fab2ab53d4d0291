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
