//! The JavaScript client (`clients/js`): its own tests in Node (`node --test`) against this
//! binary, restarted mid-session by the test; and its type declarations compiled with
//! `tsc --strict` against a sample use. `./scripts/test` installs Node and runs
//! `npm ci --prefix clients/js` first.

use std::path::PathBuf;
use std::time::Duration;

#[path = "common/source.rs"]
mod source;

fn js_dir() -> PathBuf {
    source::source_root().join("clients/js")
}

fn require_node_modules() {
    assert!(
        js_dir().join("node_modules/ws").exists() && js_dir().join("node_modules/typescript").exists(),
        "clients/js/node_modules is missing: run `npm ci --prefix clients/js` (./scripts/test does)"
    );
}

async fn run(cmd: &mut tokio::process::Command, within: Duration) -> std::process::Output {
    let out = tokio::time::timeout(within, cmd.kill_on_drop(true).output()).await;
    out.unwrap_or_else(|_| panic!("{cmd:?} did not finish within {within:?}")).expect("spawn node")
}

#[tokio::test]
async fn node_tests_against_the_real_server_including_a_restart() {
    require_node_modules();
    let out = run(
        tokio::process::Command::new("node")
            .args(["--test", "--test-reporter=spec", "test/"])
            .current_dir(js_dir())
            .env("PRESENCED_BIN", env!("CARGO_BIN_EXE_presenced")),
        Duration::from_secs(120),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "node --test failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // Every test ran (a renamed or skipped one would otherwise pass unseen).
    let names = [
        "backoff grows",
        "heartbeats at the server's interval",
        "activity: no input or a hidden page is idle",
        "close() while the socket is still connecting",
        "typing: one frame",
        "a reload continues the session",
        "a draining server's 1012",
        "a conversation: counts and the members online",
        "a server restart mid-session",
    ];
    for name in names {
        assert!(stdout.contains(name), "{name:?} did not run:\n{stdout}");
    }
    assert!(stdout.contains(&format!("ℹ pass {}", names.len())) && stdout.contains("ℹ skipped 0"), "{stdout}");
}

#[tokio::test]
async fn type_declarations_compile_strictly() {
    require_node_modules();
    let tsc = js_dir().join("node_modules/typescript/bin/tsc");
    let out = run(tokio::process::Command::new("node").arg(tsc).args(["-p", "."]).current_dir(js_dir()), Duration::from_secs(120)).await;
    assert!(
        out.status.success(),
        "tsc refused the declarations:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The npm package holds the module, its types and its manifest, and nothing else.
#[tokio::test]
async fn the_npm_package_holds_the_module_and_its_types() {
    let out =
        run(tokio::process::Command::new("npm").args(["pack", "--dry-run", "--json"]).current_dir(js_dir()), Duration::from_secs(60)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("npm pack --json");
    let mut files: Vec<&str> = v[0]["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["package.json", "src/index.d.ts", "src/index.js"]);
    assert_eq!(v[0]["name"], "@presenced/client");
}
