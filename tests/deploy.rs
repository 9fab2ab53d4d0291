//! The deployment files under `deploy/`, tested as far as this machine allows (it has no
//! container engine and no Kubernetes):
//! - each file is checked by the tool its platform uses: hadolint (the Dockerfile),
//!   docker-compose's own `config` (the compose file), the Kubernetes schemas
//!   (kubernetes-validate, strict), `systemd-analyze verify` (the unit);
//! - the binary is then started with exactly the command, environment and configuration
//!   those files give it (the image's `ENV`, `ENTRYPOINT` and `CMD` under the service's or
//!   the container's own), against real nats-servers started from the compose file's
//!   configurations, and probed as the platform would (the image's `HEALTHCHECK`, the
//!   pod's readiness and liveness probes, its `preStop` and grace period). So a renamed
//!   flag, key or path in one of them breaks a test.
//!
//! What is substituted, and only that: host names become loopback addresses of their own
//! (127.0.0.51 and up, so the files' fixed ports 8080, 9090, 4222 do not clash), the
//! address presenced binds becomes that address (a container binds 0.0.0.0 in its own
//! network namespace), and the paths a platform mounts (`/var/lib/presenced`,
//! `/etc/presenced`, `/data`) become temporary directories.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_presenced");

fn deploy(file: &str) -> PathBuf {
    Path::new(ROOT).join("deploy").join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// A tool from PyPI that `scripts/test` installs: on the PATH, or where it puts it.
fn tool(name: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let venv = Path::new(&home).join(".cache/presenced-tools/compose-v1/bin").join(name);
    if venv.exists() {
        return venv;
    }
    let found = std::env::var("PATH").unwrap_or_default().split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists());
    found.unwrap_or_else(|| panic!("{name} not found: ./scripts/test installs it"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A process in its own group, killed (the group) when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        Proc(cmd.stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}")))
    }

    /// SIGTERM, then how long it took to exit (at most `within`) and its exit code.
    fn terminate(&mut self, within: Duration) -> (Duration, Option<i32>) {
        let start = Instant::now();
        let _ = Command::new("kill").args(["-s", "TERM", &self.0.id().to_string()]).status();
        while start.elapsed() < within {
            if let Some(status) = self.0.try_wait().unwrap() {
                return (start.elapsed(), status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("still running {within:?} after SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

fn nats_server() -> PathBuf {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nats-server (./scripts/test installs it)")
}

/// What the image gives every container: `ENV`, `ENTRYPOINT`, `CMD`, the `HEALTHCHECK`
/// command, `EXPOSE`d ports and the `USER`.
#[derive(Debug, Default)]
struct Image {
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
    expose: Vec<u16>,
    user: String,
}

/// The final stage of deploy/Dockerfile (continuation lines joined).
fn image() -> Image {
    let text = read("Dockerfile").replace("\\\n", " ");
    let stages: Vec<&str> = text.split("\nFROM ").collect();
    let last = stages.last().expect("a stage");
    let json = |s: &str| -> Vec<String> { serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not a JSON array ({e}): {s}")) };
    let mut img = Image::default();
    for line in last.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV key=value");
                    img.env.push((k.into(), v.into()));
                }
            }
            "ENTRYPOINT" => img.entrypoint = json(rest),
            "CMD" => img.cmd = json(rest),
            "HEALTHCHECK" => img.healthcheck = json(rest.split_once("CMD").expect("HEALTHCHECK ... CMD [...]").1),
            "EXPOSE" => img.expose = rest.split_whitespace().map(|p| p.parse().unwrap()).collect(),
            "USER" => img.user = rest.into(),
            _ => {}
        }
    }
    img
}

/// `presenced` as the image runs it: `ENTRYPOINT` + `args`, the image's environment under
/// `env` (later wins), with `subst` applied to every value and the bound address `host`.
fn presenced(img: &Image, args: &[String], env: &[(String, String)], subst: &[(String, String)], host: &str) -> Command {
    assert_eq!(img.entrypoint, ["presenced"], "the image's entrypoint is the binary");
    let sub = |v: &str| subst.iter().fold(v.to_string(), |v, (from, to)| v.replace(from, to));
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(args.iter().map(|a| sub(a)));
    for (k, v) in img.env.iter().chain(env) {
        cmd.env(k, sub(v));
    }
    cmd.env("PRESENCE_SERVICE__HOST", host);
    cmd
}

/// Runs the image's `HEALTHCHECK` against a container at `ip`.
fn healthcheck(img: &Image, ip: &str) -> bool {
    let argv: Vec<String> = img.healthcheck.iter().map(|a| a.replace("127.0.0.1", ip)).collect();
    Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_dockerfile_passes_hadolint_and_runs_non_root() {
    let (ok, out) = run(Command::new(tool("hadolint")).arg(deploy("Dockerfile")));
    assert!(ok && out.trim().is_empty(), "hadolint: {out}");
    let img = image();
    assert_eq!(img.user, "10001:10001", "the image runs as a non-root user");
    assert_eq!(img.expose, [8080, 9090]);
    assert_eq!(img.cmd, ["serve"]);
    assert!(read("Dockerfile").contains("VOLUME [\"/var/lib/presenced\"]"));
    assert!(img.env.contains(&("PRESENCE_SERVICE__DATA_DIR".into(), "/var/lib/presenced".into())), "the data dir is the volume");
    // hadolint does fail on a bad Dockerfile (this test checks something).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian\nRUN cd /tmp && apt-get install curl\n").unwrap();
    assert!(!run(Command::new(tool("hadolint")).arg(&bad)).0);
}

#[test]
fn every_kubernetes_manifest_matches_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes")).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(files.len() >= 5, "{files:?}");
    let (ok, out) = run(Command::new(tool("kubernetes-validate")).args(["--strict", "-k", "1.29.0"]).args(&files));
    assert!(ok && !out.contains("WARN") && !out.contains("ERROR"), "{out}");
    let kinds: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.split("\n---\n")
                .map(|d| serde_yaml::from_str::<Value>(d).unwrap()["kind"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for kind in ["StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    // A misspelt field fails the strict check.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, read("kubernetes/pdb.yaml").replace("maxUnavailable", "maxUnavailible")).unwrap();
    assert!(!run(Command::new(tool("kubernetes-validate")).args(["--strict", "-k", "1.29.0"]).arg(&bad)).0);
}

#[test]
fn the_systemd_unit_verifies() {
    // The only change: ExecStart names this build's binary (verify checks that it exists).
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("presenced.service");
    std::fs::write(&unit, read("systemd/presenced.service").replace("/usr/local/bin/presenced", BIN)).unwrap();
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    // An unknown key is reported (this test checks something).
    std::fs::write(&unit, read("systemd/presenced.service").replace("/usr/local/bin/presenced", BIN).replace("ProtectHome", "ProtectHom"))
        .unwrap();
    let (_, out) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(out.contains("Unknown key"), "{out}");
}

/// `[Service]` values of the unit.
struct Unit {
    /// Every `Environment=`, in order.
    env: Vec<(String, String)>,
    /// The `ExecStart` words.
    exec: Vec<String>,
    /// The other keys.
    keys: BTreeMap<String, String>,
}

fn unit() -> Unit {
    let (mut env, mut exec, mut keys) = (Vec::new(), Vec::new(), BTreeMap::new());
    for line in read("systemd/presenced.service").lines().filter(|l| !l.starts_with('#')) {
        let Some((k, v)) = line.split_once('=') else { continue };
        match k {
            "Environment" => {
                let (ek, ev) = v.split_once('=').unwrap();
                env.push((ek.to_string(), ev.to_string()));
            }
            "ExecStart" => exec = v.split_whitespace().map(String::from).collect(),
            _ => {
                keys.insert(k.to_string(), v.to_string());
            }
        }
    }
    Unit { env, exec, keys }
}

/// The unit's command, environment, environment file and configuration file start a node
/// that answers `/health`, and SIGTERM stops it with exit 0 within `TimeoutStopSec`.
#[test]
fn the_systemd_unit_runs_the_node_it_describes() {
    let Unit { env, exec, keys } = unit();
    assert_eq!(exec[0], "/usr/local/bin/presenced");
    let dir = tempfile::tempdir().unwrap();
    let (etc, state) = (dir.path().join("etc"), dir.path().join("state"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::copy(deploy("systemd/presenced.yaml"), etc.join("presenced.yaml")).unwrap();
    let env_file = keys["EnvironmentFile"].trim_start_matches('-').replace("/etc/presenced", &etc.display().to_string());
    std::fs::write(&env_file, format!("PRESENCE_AUTH__JWT_SECRET={}\n", "s".repeat(40))).unwrap();
    let sub = |v: &str| v.replace("/etc/presenced", &etc.display().to_string()).replace("/var/lib/presenced", &state.display().to_string());
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(&exec[1..]);
    for (k, v) in &env {
        cmd.env(k, sub(v));
    }
    for line in std::fs::read_to_string(&env_file).unwrap().lines() {
        let (k, v) = line.split_once('=').unwrap();
        cmd.env(k, v);
    }
    let ip = "127.0.0.59";
    cmd.env("PRESENCE_SERVICE__HOST", ip);
    let mut p = Proc::spawn(&mut cmd);
    wait_until("the unit's node answers /health", Duration::from_secs(20), || {
        Command::new("curl").args(["-fsS", "-o", "/dev/null", &format!("http://{ip}:8080/health")]).status().is_ok_and(|s| s.success())
    });
    assert!(state.join("presence.redb").exists(), "the node keeps its data in the unit's StateDirectory");
    let stop: u64 = keys["TimeoutStopSec"].parse().unwrap();
    let (took, code) = p.terminate(Duration::from_secs(stop));
    assert_eq!(code, Some(0), "a clean stop (Restart=on-failure does not fire)");
    eprintln!("stopped in {took:?} (TimeoutStopSec {stop} s)");
    assert_eq!(keys["RestartPreventExitStatus"], "64", "a refused configuration is not restarted");
}

/// `docker-compose config` of deploy/compose.yaml, with a JWT secret given.
fn compose() -> Value {
    let (ok, out) =
        run(Command::new(tool("docker-compose")).arg("-f").arg(deploy("compose.yaml")).arg("config").env("JWT_SECRET", "c".repeat(40)));
    assert!(ok, "docker-compose config: {out}");
    serde_yaml::from_str(&out).unwrap()
}

#[test]
fn the_compose_file_validates_and_asks_for_the_secret() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    assert_eq!(services.len(), 6, "three nats-servers, three presenced");
    for name in ["presenced-center", "presenced-leaf-a", "presenced-leaf-b"] {
        let s = &c["services"][name];
        assert_eq!(s["build"]["dockerfile"], "deploy/Dockerfile", "{name}");
        assert!(s["depends_on"].is_null(), "{name}: no start order is needed (a node waits for its store)");
    }
    let (ok, out) = run(Command::new(tool("docker-compose")).arg("-f").arg(deploy("compose.yaml")).arg("config").env_remove("JWT_SECRET"));
    assert!(!ok && out.contains("set JWT_SECRET"), "{out}");
}

/// Seed 003's layout as deploy/compose.yaml runs it, presenced started before any
/// nats-server (the compose file sets no order): each node waits (its health check
/// fails), then serves when its NATS is up; a status set through one leaf is read
/// through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_layout_starts_in_any_order() {
    let c = compose();
    let img = image();
    let ips: BTreeMap<&str, &str> = [
        ("nats-center", "127.0.0.51"),
        ("nats-leaf-a", "127.0.0.52"),
        ("nats-leaf-b", "127.0.0.53"),
        ("presenced-center", "127.0.0.54"),
        ("presenced-leaf-a", "127.0.0.55"),
        ("presenced-leaf-b", "127.0.0.56"),
    ]
    .into();
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();
    for name in ["presenced-center", "presenced-leaf-a", "presenced-leaf-b"] {
        let s = &c["services"][name];
        let args: Vec<String> = s["command"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
        let env: Vec<(String, String)> =
            s["environment"].as_mapping().unwrap().iter().map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into())).collect();
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).unwrap();
        let mut subst: Vec<(String, String)> = ips.iter().map(|(h, ip)| (format!("//{h}:"), format!("//{ip}:"))).collect();
        subst.push(("/var/lib/presenced".into(), data.display().to_string()));
        procs.push(Proc::spawn(&mut presenced(&img, &args, &env, &subst, ips[name])));
    }
    std::thread::sleep(Duration::from_secs(2));
    for name in ["presenced-center", "presenced-leaf-a", "presenced-leaf-b"] {
        assert!(!healthcheck(&img, ips[name]), "{name} is not healthy while its NATS is down");
    }
    // The nats-servers, leaves first, each from the configuration file the compose file mounts.
    for name in ["nats-leaf-a", "nats-leaf-b", "nats-center"] {
        let s = &c["services"][name];
        let volume = s["volumes"][0].as_str().unwrap();
        let (source, target) = volume.split_once(':').unwrap();
        let target = target.trim_end_matches(":ro");
        let mut conf = std::fs::read_to_string(source).unwrap().replace("0.0.0.0", ips[name]);
        for (h, ip) in &ips {
            conf = conf.replace(&format!("//{h}:"), &format!("//{ip}:"));
        }
        let store = dir.path().join(name);
        conf = conf.replace("\"/data\"", &format!("\"{}\"", store.display()));
        let path = dir.path().join(format!("{name}.conf"));
        std::fs::write(&path, conf).unwrap();
        let args: Vec<String> =
            s["command"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().replace(target, &path.display().to_string())).collect();
        procs.push(Proc::spawn(Command::new(nats_server()).args(&args)));
    }
    for name in ["presenced-center", "presenced-leaf-a", "presenced-leaf-b"] {
        wait_until(&format!("{name} healthy once NATS is up"), Duration::from_secs(60), || healthcheck(&img, ips[name]));
    }
    // One cluster: written through leaf-a, read through leaf-b.
    let secret = c["services"]["presenced-leaf-a"]["environment"]["PRESENCE_AUTH__JWT_SECRET"].as_str().unwrap().to_string();
    let out = Command::new(BIN).env_clear().env("PRESENCE_AUTH__JWT_SECRET", &secret).args(["token", "--sub", "alice"]).output().unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let http = reqwest::Client::new();
    let r = http
        .put(format!("http://{}:8080/api/v2/presence/alice", ips["presenced-leaf-a"]))
        .bearer_auth(&token)
        .json(&serde_json::json!({"status": "busy", "message": "compose"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = format!("http://{}:8080/api/v2/presence/alice", ips["presenced-leaf-b"]);
    common::eventually("leaf-b reads what leaf-a wrote", Duration::from_secs(10), async || {
        let v: serde_json::Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        v["data"]["alice"]["message"] == "compose"
    })
    .await;
}

/// The StatefulSet's container as Kubernetes would start it: the image's entrypoint with
/// its args, its environment (values, the Secret's key, the pod name), the ConfigMap
/// mounted where PRESENCE_CONFIG says. Liveness holds while the node waits for NATS and
/// readiness does not; readiness follows once NATS is up; the preStop and the drain fit
/// in terminationGracePeriodSeconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_pod_starts_probes_and_drains_as_its_manifest_says() {
    let doc = |f: &str| -> Value { serde_yaml::from_str(&read(f)).unwrap() };
    let (sts, cm, secret) = (doc("kubernetes/statefulset.yaml"), doc("kubernetes/configmap.yaml"), doc("kubernetes/secret.yaml"));
    let pod = &sts["spec"]["template"]["spec"];
    let ctr = &pod["containers"][0];
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    // Mounts: the ConfigMap's files and the data volume, at temporary paths.
    let mut subst: Vec<(String, String)> = Vec::new();
    for m in ctr["volumeMounts"].as_sequence().unwrap() {
        let (name, at) = (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap());
        let local = dir.path().join(name);
        std::fs::create_dir_all(&local).unwrap();
        let vol = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == name);
        if let Some(cm_name) = vol.and_then(|v| v["configMap"]["name"].as_str()) {
            assert_eq!(cm["metadata"]["name"], cm_name);
            for (file, content) in cm["data"].as_mapping().unwrap() {
                // The one Service name the config uses: nats → an address of its own.
                let text = content.as_str().unwrap().replace("nats://nats:4222", "nats://127.0.0.57:4222");
                std::fs::write(local.join(file.as_str().unwrap()), text).unwrap();
            }
        }
        subst.push((at.to_string(), local.display().to_string()));
    }
    let pod_name = format!("{}-0", sts["metadata"]["name"].as_str().unwrap());
    let env: Vec<(String, String)> = ctr["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(key) = e["valueFrom"]["secretKeyRef"]["key"].as_str() {
                assert_eq!(e["valueFrom"]["secretKeyRef"]["name"], secret["metadata"]["name"]);
                secret["stringData"][key].as_str().unwrap().to_string()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod_name.clone()
            } else {
                panic!("an env entry this test does not resolve: {e:?}")
            };
            (name, value)
        })
        .collect();
    let args: Vec<String> = ctr["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let ip = "127.0.0.58";
    let port_of = |name: &str| -> u16 {
        let ports = ctr["ports"].as_sequence().unwrap();
        ports.iter().find(|p| p["name"] == name).unwrap()["containerPort"].as_u64().unwrap() as u16
    };
    // The manifest's Secret is a placeholder: refused, so an unchanged copy cannot run
    // with a published key.
    let out = presenced(&img, &args, &env, &subst, ip).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "the placeholder secret is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret"));
    // As the README creates it: `kubectl create secret ... --from-literal=jwt-secret="$(openssl rand -hex 32)"`.
    let env: Vec<(String, String)> =
        env.into_iter().map(|(k, v)| if k == "PRESENCE_AUTH__JWT_SECRET" { (k, "9f".repeat(32)) } else { (k, v) }).collect();
    let mut node = Proc::spawn(&mut presenced(&img, &args, &env, &subst, ip));

    let readiness = &ctr["readinessProbe"]["httpGet"];
    let ready_url = format!("http://{ip}:{}{}", port_of(readiness["port"].as_str().unwrap()), readiness["path"].as_str().unwrap());
    let live_port = port_of(ctr["livenessProbe"]["tcpSocket"]["port"].as_str().unwrap());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let ready = async || http.get(&ready_url).send().await.is_ok_and(|r| r.status() == 200);
    let live = || std::net::TcpStream::connect_timeout(&format!("{ip}:{live_port}").parse().unwrap(), Duration::from_secs(1)).is_ok();
    common::eventually("the port open while waiting for NATS", Duration::from_secs(10), async || live()).await;
    assert!(!ready().await, "not ready without NATS");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(live(), "still alive while waiting: the liveness probe does not restart it");

    let nats_dir = dir.path().join("nats");
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, format!("listen: 127.0.0.57:4222\njetstream {{ store_dir: \"{}\"\nmax_file_store: 8GB }}\n", nats_dir.display()))
        .unwrap();
    let _nats = Proc::spawn(Command::new(nats_server()).arg("-c").arg(&conf));
    common::eventually("ready once NATS is up", Duration::from_secs(60), ready).await;
    let health: serde_json::Value = http.get(&ready_url).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["data"]["node_id"], pod_name.as_str(), "the pod name is the node id");
    assert_eq!(health["data"]["store"]["backend"], "nats", "the ConfigMap's configuration is in force");

    // Termination as the kubelet does it: preStop, then SIGTERM, within the grace period.
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let pre_stop: Vec<String> =
        ctr["lifecycle"]["preStop"]["exec"]["command"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    let started = Instant::now();
    assert!(Command::new(&pre_stop[0]).args(&pre_stop[1..]).status().unwrap().success());
    let (_, code) = node.terminate(grace.saturating_sub(started.elapsed()));
    assert_eq!(code, Some(0));
    eprintln!("preStop and drain took {:?} of a {grace:?} grace period", started.elapsed());
}
