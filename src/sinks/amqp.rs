//! The AMQP 0-9-1 sink (RabbitMQ), for teams running RabbitMQ beside NATS while they
//! migrate (seed 002): every event is published to a durable topic exchange (`exchange`,
//! default `presence`) with routing key `presence.<type>.<user_id>` (e.g.
//! `presence.user_offline.alice`), as a persistent JSON message (the documented event
//! schema, `content_type` `application/json`; consumers deduplicate by its `user_id` +
//! `revision`).
//!
//! Publisher confirms: a batch counts as delivered only once the broker confirmed every
//! message of it; a nack, a lost connection or no confirm within the sink's `timeout`
//! fails the batch (it is published again: at-least-once). The connection is opened
//! lazily and again after any failure; the exchange is declared (durable) on each.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::outbox::Queued;
use super::EventSink;
use crate::config::SinkConfig;

pub struct Amqp {
    url: String,
    exchange: String,
    name: String,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl Amqp {
    pub fn new(cfg: &SinkConfig) -> Amqp {
        Amqp { url: cfg.url.clone(), exchange: cfg.exchange.clone(), name: cfg.name.clone(), link: Mutex::new(None) }
    }

    async fn connect(&self) -> Result<(Connection, Channel), String> {
        let props = ConnectionProperties::default().with_connection_name(format!("presenced sink {}", self.name).into());
        let conn = Connection::connect(&self.url, props).await.map_err(|e| format!("AMQP connect: {e}"))?;
        let ch = conn.create_channel().await.map_err(|e| format!("AMQP channel: {e}"))?;
        ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| format!("AMQP confirm.select: {e}"))?;
        let opts = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        ch.exchange_declare(self.exchange.as_str().into(), ExchangeKind::Topic, opts, FieldTable::default())
            .await
            .map_err(|e| format!("AMQP exchange.declare {}: {e}", self.exchange))?;
        Ok((conn, ch))
    }

    async fn publish(&self, ch: &Channel, batch: &[Queued]) -> Result<(), String> {
        let mut confirms = Vec::with_capacity(batch.len());
        for q in batch {
            let routing_key = format!("presence.{}.{}", q.record.kind, q.record.user);
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_timestamp((q.record.at / 1000).max(0) as u64);
            let confirm = ch
                .basic_publish(
                    self.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &q.record.body,
                    props,
                )
                .await
                .map_err(|e| format!("AMQP publish: {e}"))?;
            confirms.push(confirm);
        }
        for c in confirms {
            let confirmation = c.await.map_err(|e| format!("AMQP confirm: {e}"))?;
            if confirmation.is_nack() {
                return Err("AMQP: the broker refused (nack) a message".into());
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventSink for Amqp {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn deliver(&self, batch: &[Queued]) -> Result<(), String> {
        let mut link = self.link.lock().await;
        if link.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
            *link = Some(self.connect().await?);
        }
        let Some((_, ch)) = link.as_ref() else { return Err("AMQP: no channel".into()) };
        let r = self.publish(ch, batch).await;
        if r.is_err() {
            // Start afresh next time: the channel may be closed, or confirms lost.
            if let Some((conn, _)) = link.take() {
                let _ = conn.close(0, "presenced: reconnecting".into()).await;
            }
        }
        r
    }
}
