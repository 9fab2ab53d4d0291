//! The engine a cluster runs on, for tests written once and run on each: a real
//! nats-server, a real redis-server, or a real three-master Redis Cluster.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;

use super::nats::NatsServer;
use super::redis::{RedisCluster, RedisServer};
use super::TestServer;

pub enum Engine {
    Nats(NatsServer),
    Redis(RedisServer),
    RedisCluster(RedisCluster),
}

impl Engine {
    pub fn nats() -> Engine {
        Engine::Nats(NatsServer::start(""))
    }

    pub fn redis() -> Engine {
        Engine::Redis(RedisServer::start(&[]))
    }

    pub fn redis_cluster() -> Engine {
        Engine::RedisCluster(RedisCluster::start())
    }

    /// The `store.backend` (and `/health/<name>`, metric prefix).
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Nats(_) => "nats",
            Engine::Redis(_) | Engine::RedisCluster(_) => "redis",
        }
    }

    /// The port of the (first) server, for a proxy in front of it.
    pub fn port(&self) -> u16 {
        match self {
            Engine::Nats(s) => s.port,
            Engine::Redis(s) => s.port,
            Engine::RedisCluster(c) => c.nodes[0].port,
        }
    }

    /// The settings of a node on this engine, connecting to `port` (a proxy) if given.
    pub fn env(&self, node: &str, port: Option<u16>) -> Vec<(String, String)> {
        let at = |p: u16| port.unwrap_or(p);
        let mut env = vec![
            ("PRESENCE_STORE__BACKEND".to_string(), self.name().to_string()),
            ("PRESENCE_SERVICE__NODE_ID".to_string(), node.to_string()),
        ];
        match self {
            Engine::Nats(s) => env.push(("PRESENCE_NATS__URLS".into(), format!("[\"nats://127.0.0.1:{}\"]", at(s.port)))),
            Engine::Redis(s) => env.push(("PRESENCE_REDIS__URLS".into(), format!("[\"redis://127.0.0.1:{}\"]", at(s.port)))),
            Engine::RedisCluster(c) => {
                let urls: Vec<String> = c.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect();
                env.push(("PRESENCE_REDIS__URLS".into(), serde_json::to_string(&urls).unwrap()));
                env.push(("PRESENCE_REDIS__CLUSTER".into(), "true".into()));
            }
        }
        env
    }

    /// An in-process node on this engine, with more settings.
    pub async fn node_with(&self, id: &str, extra: &[(&str, &str)]) -> TestServer {
        let env = self.env(id, None);
        let mut refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        refs.extend_from_slice(extra);
        TestServer::start(&refs).await
    }

    pub async fn node(&self, id: &str) -> TestServer {
        self.node_with(id, &[]).await
    }

    /// Kills the (first) server.
    pub fn stop(&mut self) {
        match self {
            Engine::Nats(s) => s.stop(),
            Engine::Redis(s) => s.stop(),
            Engine::RedisCluster(c) => c.nodes[0].stop(),
        }
    }

    /// Starts it again on the same port (NATS keeps its JetStream data; Redis, run
    /// without persistence, comes back empty).
    pub fn restart(&mut self) {
        match self {
            Engine::Nats(s) => s.restart(),
            Engine::Redis(s) => s.restart(),
            Engine::RedisCluster(c) => c.nodes[0].restart(),
        }
    }
}

/// Every event of one kind (`online`, `offline`) the engine carried, by user, in order:
/// from NATS (a subscription opened before), or from Redis's event stream (read with
/// redis-cli): what a durable consumer (seed 001's delivery service) would get.
pub enum EventLog {
    Nats(async_nats::Subscriber, &'static str),
    Redis(u16, &'static str),
}

impl EventLog {
    pub async fn open(e: &Engine, kind: &'static str) -> EventLog {
        match e {
            Engine::Nats(s) => {
                let client = async_nats::connect(s.url()).await.unwrap();
                let sub = client.subscribe(format!("presence.{kind}.>")).await.unwrap();
                client.flush().await.unwrap();
                EventLog::Nats(sub, kind)
            }
            _ => EventLog::Redis(e.port(), kind),
        }
    }

    /// The users of the events so far, sorted (on Redis: since the stream began).
    pub async fn users(&mut self) -> Vec<String> {
        let mut users = Vec::new();
        match self {
            EventLog::Nats(sub, kind) => {
                let prefix = format!("presence.{kind}.");
                while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                    users.push(m.subject.trim_start_matches(prefix.as_str()).to_string());
                }
            }
            EventLog::Redis(port, kind) => {
                let out =
                    Command::new("redis-cli").args(["-p", &port.to_string(), "XRANGE", "presence:events", "-", "+"]).output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                let lines: Vec<&str> = text.lines().collect();
                let wanted = format!("user_{kind}");
                for (i, l) in lines.iter().enumerate() {
                    if *l == wanted && lines.get(i + 1) == Some(&"user_id") {
                        users.push(lines[i + 2].to_string());
                    }
                }
            }
        }
        users.sort();
        users
    }
}

/// Runs an `async fn(Engine)` test on NATS, Redis and (where named) a Redis Cluster:
/// `on_engines!(test_fn: nats, redis, redis_cluster);`
#[macro_export]
macro_rules! on_engines {
    ($f:ident: $($engine:ident),+) => {
        mod $f {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $engine() {
                    super::$f(super::common::engine::Engine::$engine()).await;
                }
            )+
        }
    };
}
