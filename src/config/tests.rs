//! The configuration as an operator writes it: files, interpolation, overrides, errors.

use super::*;
use std::io::Write;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn defaults_need_no_file() {
    let c = Config::load(None, env(&[])).unwrap();
    assert_eq!(c.service.port, 8080);
    assert_eq!(c.service.grpc_port, 9090);
    assert_eq!(c.store.backend, Backend::Memory);
    assert_eq!(c.presence.session_ttl, Dur::secs(60));
    assert_eq!(c.limits.max_batch_ids, 1000);
    assert!(!c.service.node_id.is_empty());
}

#[test]
fn seed_config_file_loads_with_interpolation() {
    let f = file(
        "service:\n  name: presence-service\n  version: v2\n  port: 8080\n  node_type: leaf\n  node_id: center-node-1\n\
         nats:\n  embedded: true\n  data_dir: ./nats-data\n  jetstream:\n    max_memory: 1GB\n    max_file: 10GB\n  kv:\n    bucket: presence\n    ttl: 3600s\n\
         cache:\n  type: ristretto\n  max_cost: 1000000\n  num_counters: 100000\n  buffer_items: 64\n  metrics: true\n\
         auth:\n  jwt_secret: ${JWT_SECRET}\n  jwt_issuer: presence-service\n  jwt_ttl: 24h\n\
         logging:\n  level: info\n  format: json\n",
    );
    let c = Config::load(Some(f.path()), env(&[("JWT_SECRET", "s3cret-s3cret-s3cret-s3cret-s3cret")])).unwrap();
    assert_eq!(c.auth.jwt_secret, "s3cret-s3cret-s3cret-s3cret-s3cret");
    assert_eq!(c.auth.jwt_ttl, Dur::secs(86_400));
    assert_eq!(c.service.node_type, NodeType::Leaf);
    assert_eq!(c.nats.jetstream.max_file, ByteSize(10_000_000_000));
    assert_eq!(c.logging.format, LogFormat::Json);
    let err = Config::load(Some(f.path()), env(&[])).unwrap_err().to_string();
    assert!(err.contains("auth.jwt_secret") && err.contains("JWT_SECRET"), "{err}");
}

#[test]
fn interpolation_defaults_and_typed_values() {
    let f = file("service:\n  port: ${PORT:-9000}\n  name: \"svc-${ENV_NAME:-dev}\"\n");
    let c = Config::load(Some(f.path()), env(&[])).unwrap();
    assert_eq!((c.service.port, c.service.name.as_str()), (9000, "svc-dev"));
    let c = Config::load(Some(f.path()), env(&[("PORT", "8181"), ("ENV_NAME", "prod")])).unwrap();
    assert_eq!((c.service.port, c.service.name.as_str()), (8181, "svc-prod"));
}

#[test]
fn env_overrides_win_over_the_file() {
    let f = file("service:\n  port: 8080\nlimits:\n  write_burst: 5\n");
    let c = Config::load(
        Some(f.path()),
        env(&[
            ("PRESENCE_SERVICE__PORT", "8081"),
            ("PRESENCE_PRESENCE__SESSION_TTL", "90s"),
            ("PRESENCE_AUTH__JWT_SECRET", "12345678901234567890123456789012345"),
            ("PRESENCE_NATS__KV__BUCKET", "other"),
            ("PRESENCE_LIMITS__MAX_BODY_BYTES", "1MiB"),
            ("UNRELATED", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(c.service.port, 8081);
    assert_eq!(c.presence.session_ttl, Dur::secs(90));
    assert_eq!(c.auth.jwt_secret, "12345678901234567890123456789012345");
    assert_eq!(c.nats.kv.bucket, "other");
    assert_eq!(c.limits.write_burst, 5);
    assert_eq!(c.limits.max_body_bytes, ByteSize(1 << 20));
}

#[test]
fn presence_names_that_are_not_overrides_do_not_stop_the_start() {
    // What Kubernetes injects for a Service named `presence`, and the file's variable.
    let k8s = [
        ("PRESENCE_PORT", "tcp://10.0.0.7:8080"),
        ("PRESENCE_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
        ("PRESENCE_PORT_8080_TCP_ADDR", "10.0.0.7"),
        ("PRESENCE_PORT_8080_TCP_PORT", "8080"),
        ("PRESENCE_PORT_8080_TCP_PROTO", "tcp"),
        ("PRESENCE_SERVICE_HOST", "10.0.0.7"),
        ("PRESENCE_SERVICE_PORT", "8080"),
        ("PRESENCE_SERVICE_PORT_HTTP", "8080"),
        ("PRESENCE_CONFIG", "/etc/presenced/config.yaml"),
        ("PRESENCE_SERVICE__PORT", "8081"),
    ];
    let c = Config::load(None, env(&k8s)).unwrap();
    assert_eq!(c.service.port, 8081, "the real override still applies");
    assert!(!is_override("PRESENCE_SERVICE_PORT") && is_override("PRESENCE_SERVICE__PORT"));
}

#[test]
fn list_keys_take_comma_separated_strings() {
    let c =
        Config::load(None, env(&[("PRESENCE_NATS__URLS", "nats://a:4222, nats://b:4222"), ("PRESENCE_REDIS__URLS", "redis://r1:6379")]))
            .unwrap();
    assert_eq!(c.nats.urls, ["nats://a:4222", "nats://b:4222"]);
    assert_eq!(c.redis.urls, ["redis://r1:6379"]);
    let c = Config::load(None, env(&[("PRESENCE_NATS__URLS", "[nats://a:4222, nats://c:4222]")])).unwrap();
    assert_eq!(c.nats.urls, ["nats://a:4222", "nats://c:4222"], "a YAML list in the variable still works");
    let f = file("redis:\n  urls: redis://x:1,redis://y:2\n");
    assert_eq!(Config::load(Some(f.path()), env(&[])).unwrap().redis.urls, ["redis://x:1", "redis://y:2"]);
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        ("service:\n  prot: 1\n", &[], &["service", "prot"]),
        ("bogus: 1\n", &[], &["bogus"]),
        ("", &[("PRESENCE_SERVICE__NOPE", "1")], &["service", "nope"]),
        ("presence:\n  session_ttl: 10 minutes\n", &[], &["presence.session_ttl", "500ms"]),
        ("service:\n  port: 70000\n", &[], &["service.port"]),
        ("store:\n  backend: mongo\n", &[], &["store.backend", "memory"]),
        ("limits:\n  max_body_bytes: lots\n", &[], &["limits.max_body_bytes", "64KiB"]),
        ("presence:\n  heartbeat_interval: 90s\n", &[], &["presence.heartbeat_interval"]),
        ("limits:\n  write_rate_per_sec: 0\n", &[], &["limits.write_rate_per_sec"]),
        ("", &[("PRESENCE_SERVICE__", "1")], &["PRESENCE_SERVICE__", "PRESENCE_<SECTION>__<KEY>"]),
        ("", &[("PRESENCE_SERVCE__PORT", "1")], &["servce"]),
        ("nats:\n  urls: {a: 1}\n", &[], &["nats.urls", "comma-separated"]),
        ("auth:\n  jwt_secret: short\n", &[], &["auth.jwt_secret", "32 bytes"]),
        ("", &[("PRESENCE_AUTH__JWT_SECRET", "                                      ")], &["auth.jwt_secret"]),
        ("limits:\n  header_read_timeout: 0s\n", &[], &["limits.header_read_timeout"]),
        ("", &[("PRESENCE_SERVICE__WORKER_THREADS", "5000")], &["service.worker_threads"]),
    ];
    for (text, vars, needles) in cases {
        let f = file(text);
        let err = Config::load(Some(f.path()), env(vars)).unwrap_err().to_string();
        for n in *needles {
            assert!(err.contains(n), "error for {text:?} {vars:?} should mention {n:?}: {err}");
        }
    }
}

#[test]
fn errors_say_which_kind_of_mistake() {
    let load = |text: &str, vars: &[(&str, &str)]| Config::load(Some(file(text).path()), env(vars)).unwrap_err();
    let e = load("service:\n  prot: 1\n", &[]);
    assert!(matches!(&e, ConfigError::UnknownKey { .. }), "{e:?}");
    assert!(matches!(load("service:\n  port: 70000\n", &[]), ConfigError::BadValue { key, .. } if key == "service.port"));
    assert!(matches!(load("presence:\n  heartbeat_interval: 90s\n", &[]), ConfigError::Rule { .. }));
    assert!(matches!(load("auth:\n  jwt_secret: ${NOPE}\n", &[]), ConfigError::Variable { key, .. } if key == "auth.jwt_secret"));
    assert!(matches!(load("", &[("PRESENCE__PORT", "1")]), ConfigError::Override { var, .. } if var == "PRESENCE__PORT"));
}

#[test]
fn secrets_are_not_printed() {
    let c = Config::load(
        None,
        env(&[
            ("PRESENCE_AUTH__JWT_SECRET", "topsecret-topsecret-topsecret-topsecret"),
            ("PRESENCE_NATS__PASSWORD", "natspass"),
            ("PRESENCE_NATS__USER", "svc"),
        ]),
    )
    .unwrap();
    assert_eq!(c.nats.password, "natspass");
    let printed = format!("{c:?}\n{}", serde_yaml::to_string(&c.redacted()).unwrap());
    assert!(!printed.contains("topsecret") && !printed.contains("natspass"), "{printed}");
    assert!(printed.contains("svc"));
    let err = Config::load(None, env(&[("PRESENCE_NATS__TOKEN", "t"), ("PRESENCE_NATS__PASSWORD", "p")])).unwrap_err().to_string();
    assert!(err.contains("nats") && err.contains("only one"), "{err}");
}
