//! The AMQP 0-9-1 sink (RabbitMQ), for teams running RabbitMQ beside NATS while they
//! migrate (seed 002): every event is published to a durable topic exchange (`exchange`,
//! default `presence`) with routing key `presence.<type>.<user_id>` (e.g.
//! `presence.user_offline.alice`), as a persistent JSON message (the documented event
//! schema, `content_type` `application/json`; consumers deduplicate by its `user_id` +
//! `revision`).
//!
//! Publisher confirms: a batch counts as delivered only once the broker confirmed every
//! message of it; a nack, a lost connection or no confirm within the sink's `timeout`
//! fails the batch (it is published again: at-least-once). Messages are `mandatory`: one
//! that no queue is bound to receive comes back (basic.return before its confirm), and
//! with `unroutable: keep` (the default) that fails the batch too, so events wait in the
//! outbox until a consumer binds a queue instead of vanishing; `unroutable: drop` counts
//! them (`sink_events_unroutable_total`) and goes on. The connection, with the exchange
//! declared (durable), is opened at start (the sink's check), lazily after any failure.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::outbox::Queued;
use super::EventSink;
use crate::config::{SinkConfig, Unroutable};

pub struct Amqp {
    url: String,
    exchange: String,
    name: String,
    unroutable: Unroutable,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl Amqp {
    pub fn new(cfg: &SinkConfig) -> Amqp {
        Amqp {
            url: cfg.url.clone(),
            exchange: cfg.exchange.clone(),
            name: cfg.name.clone(),
            unroutable: cfg.unroutable,
            link: Mutex::new(None),
        }
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

    /// Publishes a batch and waits for its confirms. `Err((reason, keep_link))`: the
    /// batch failed; the link is still good when only routing failed.
    async fn publish(&self, ch: &Channel, batch: &[Queued]) -> Result<(), (String, bool)> {
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
                    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                    &q.record.body,
                    props,
                )
                .await
                .map_err(|e| (format!("AMQP publish: {e}"), false))?;
            confirms.push((confirm, routing_key));
        }
        let mut unroutable: Option<String> = None;
        let mut dropped = 0u64;
        for (c, key) in confirms {
            let confirmation = c.await.map_err(|e| (format!("AMQP confirm: {e}"), false))?;
            if confirmation.is_nack() {
                return Err(("AMQP: the broker refused (nack) a message".into(), false));
            }
            if confirmation.take_message().is_some() {
                dropped += 1;
                unroutable.get_or_insert(key);
            }
        }
        match (unroutable, self.unroutable) {
            (None, _) => Ok(()),
            (Some(_), Unroutable::Drop) => {
                metrics::counter!("sink_events_unroutable_total", "sink" => self.name.clone()).increment(dropped);
                Ok(())
            }
            (Some(key), Unroutable::Keep) => Err((
                format!(
                    "AMQP: no queue is bound to exchange {} for {key} ({dropped} of {} unroutable): bind a durable queue (e.g. to presence.#); the events wait in the outbox",
                    self.exchange,
                    batch.len()
                ),
                true,
            )),
        }
    }

    /// The live link, opened (and the exchange declared) if there is none.
    async fn link<'a>(&self, link: &'a mut Option<(Connection, Channel)>) -> Result<&'a Channel, String> {
        if link.as_ref().is_none_or(|(c, _)| !c.status().connected()) {
            *link = Some(self.connect().await?);
        }
        link.as_ref().map(|(_, ch)| ch).ok_or_else(|| "AMQP: no channel".to_string())
    }
}

#[async_trait]
impl EventSink for Amqp {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    async fn deliver(&self, batch: &[Queued]) -> Result<(), String> {
        let mut link = self.link.lock().await;
        let ch = self.link(&mut link).await?;
        match self.publish(ch, batch).await {
            Ok(()) => Ok(()),
            Err((e, keep_link)) => {
                if !keep_link {
                    // Start afresh next time: the channel may be closed, or confirms lost.
                    if let Some((conn, _)) = link.take() {
                        let _ = conn.close(0, "presenced: reconnecting".into()).await;
                    }
                }
                Err(e)
            }
        }
    }

    async fn check(&self) -> Result<(), String> {
        let mut link = self.link.lock().await;
        self.link(&mut link).await.map(|_| ())
    }
}
