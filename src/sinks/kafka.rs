//! The Kafka sink (seed 001: the Delivery Service consumes `UserOnline`/`UserOffline`
//! from Apache Kafka). Every event is a record on `topic` (default `presence.events`)
//! keyed by user id, so one user's events land in one partition, in order; the value is
//! the documented JSON event or, with `format: protobuf`, the `PresenceEvent` message of
//! the gRPC API. The record's `type` header carries the event type either way.
//!
//! librdkafka does the rest: an idempotent producer (`enable.idempotence`: its retries
//! neither duplicate nor reorder), `compression.type`, and any `properties` passed
//! through (SASL, ...). A batch counts as delivered when every record of it is
//! acknowledged by the partition leader and its replicas (`acks=all`, implied by
//! idempotence); otherwise the whole batch is produced again (at-least-once).

use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::outbox::Queued;
use super::EventSink;
use crate::config::{SinkConfig, SinkFormat};
use crate::core::Event;
use crate::wire::event::WireEvent;

pub struct Kafka {
    producer: FutureProducer,
    topic: String,
    format: SinkFormat,
}

impl Kafka {
    pub fn new(cfg: &SinkConfig) -> Result<Kafka, String> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("compression.type", &cfg.compression)
            .set("message.timeout.ms", cfg.timeout.0.as_millis().to_string())
            .set("client.id", format!("presenced-{}", cfg.name));
        for (k, v) in &cfg.properties {
            c.set(k, v);
        }
        let producer: FutureProducer = c.create().map_err(|e| format!("kafka sink {}: {e}", cfg.name))?;
        Ok(Kafka { producer, topic: cfg.topic.clone(), format: cfg.format })
    }
}

#[async_trait]
impl EventSink for Kafka {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn encode(&self, event: &Event) -> Vec<u8> {
        match self.format {
            SinkFormat::Json => serde_json::to_vec(&WireEvent::of(event)).unwrap_or_default(),
            SinkFormat::Protobuf => crate::wire::proto::event_pb(event).encode_to_vec(),
        }
    }

    async fn deliver(&self, batch: &[Queued]) -> Result<(), String> {
        let mut pending = Vec::with_capacity(batch.len());
        for q in batch {
            let headers = OwnedHeaders::new().insert(Header { key: "type", value: Some(q.record.kind.as_bytes()) });
            let record = FutureRecord::to(&self.topic).key(q.record.user.as_bytes()).payload(&q.record.body).headers(headers);
            match self.producer.send_result(record) {
                Ok(f) => pending.push(f),
                Err((e, _)) => return Err(format!("kafka: cannot queue a record: {e}")),
            }
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(format!("kafka: {e}")),
                Err(_) => return Err("kafka: the producer dropped a record".into()),
            }
        }
        Ok(())
    }

    /// The cluster's metadata for the topic (a broker answers; blocking in librdkafka,
    /// so on the blocking pool).
    async fn check(&self) -> Result<(), String> {
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(Some(&topic), Duration::from_secs(5)).map(|_| ()))
            .await
            .map_err(|e| format!("kafka: {e}"))?
            .map_err(|e| format!("kafka metadata: {e}"))
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        // What is in flight is still in the outbox: no need to wait long.
        let _ = self.producer.flush(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(props: &[(&str, &str)]) -> SinkConfig {
        SinkConfig {
            name: "k".into(),
            kind: crate::config::SinkType::Kafka,
            brokers: "127.0.0.1:9".into(),
            properties: props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..SinkConfig::default()
        }
    }

    /// SASL and TLS settings reach librdkafka as given (this build has OpenSSL), and a
    /// setting librdkafka does not know stops the start with its own message.
    #[test]
    fn security_settings_pass_through_and_unknown_ones_are_refused() {
        let tls = cfg(&[("security.protocol", "SASL_SSL"), ("sasl.mechanism", "PLAIN"), ("sasl.username", "u"), ("sasl.password", "p")]);
        assert!(Kafka::new(&tls).is_ok());
        let e = Kafka::new(&cfg(&[("no.such.setting", "1")])).err().expect("refused");
        assert!(e.contains("no.such.setting"), "{e}");
        let e = Kafka::new(&cfg(&[("security.protocol", "carrier-pigeon")])).err().expect("refused");
        assert!(e.contains("security.protocol"), "{e}");
    }
}
