//! Event sinks: every presence transition made on this node (online, offline, update,
//! expiry) delivered to outside consumers (seed 001's Delivery Service), at least once and
//! in order, through an on-disk outbox. Configured under `events.sinks`; several at once.
//!
//! Per sink, two tasks:
//! - the *dispatcher* takes this node's own transitions from its tap on the bus
//!   ([`EventBus::tap_origin`]: in cluster mode each node delivers its own, so none is
//!   sent twice; a burst beyond `events.outbox.buffer` waiting is dropped and counted),
//!   encodes them in the sink's format and hands them to a writer that appends them to
//!   the sink's [`outbox::Outbox`] (one durable commit per burst). Presence never waits.
//! - the *sender* takes batches from the outbox head, delivers them
//!   ([`EventSink::deliver`]) and removes them once acknowledged; a failure leaves them
//!   there and is retried with exponential backoff (`events.outbox.*`). Order is the
//!   outbox order, so one user's events arrive in the order they happened.
//!
//! A sink that is down degrades `/health` (it never fails it): the outbox fills, up to
//! `events.outbox.max_events`, beyond which the oldest events are dropped and counted.
//! Events still on the bus when the process stops are appended before it exits; the
//! outbox survives restarts.
//!
//! The seam is [`EventSink`]: a format (`encode`) and a delivery (`deliver`).
//! [`webhook`] (signed HTTP POSTs), [`amqp`] (RabbitMQ, publisher confirms) and `kafka`
//! (an idempotent producer; cargo feature `kafka`, on by default).

pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod outbox;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::bus::EventBus;
use crate::clock::Clock;
use crate::config::{Config, OutboxConfig, SinkConfig, SinkType};
use crate::core::Event;
use outbox::{Outbox, OutboxDb, Queued, StoredEvent};

/// Events taken off the bus in one go before the writer is woken.
const APPEND_MAX: usize = 4096;

/// Where events go.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// `webhook`, `kafka`, `amqp`.
    fn kind(&self) -> &'static str;

    /// The event in this sink's format (what the outbox keeps): by default the
    /// documented JSON event schema.
    fn encode(&self, event: &Event) -> Vec<u8> {
        serde_json::to_vec(&crate::wire::event::WireEvent::of(event)).unwrap_or_default()
    }

    /// Delivers a batch, in order. `Err`: none of it counts as delivered (the whole batch
    /// is sent again later).
    async fn deliver(&self, batch: &[Queued]) -> Result<(), String>;

    /// Whether the destination answers, without delivering anything: run at start and
    /// while the sink is down with nothing to deliver, so `/health` tells the truth before
    /// the first event (a connection and the exchange declared for AMQP, the cluster's
    /// metadata for Kafka, any HTTP answer to a `HEAD` for a webhook).
    async fn check(&self) -> Result<(), String>;
}

/// A sink's state, as `/health` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SinkHealth {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `unknown` (starting: not checked yet), `up` (the destination answered its check,
    /// or the last delivery succeeded), `down` (the check or the last delivery failed).
    pub state: &'static str,
    pub outbox_events: u64,
    /// Seconds since the oldest undelivered event happened (0 when none).
    pub lag_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

struct Status {
    /// `None` until the first check or delivery.
    up: Option<bool>,
    last_error: Option<String>,
    /// Time of the oldest undelivered event (Unix ms), when known.
    oldest_at: Option<i64>,
}

struct Runner {
    name: String,
    sink: Box<dyn EventSink>,
    outbox: Outbox,
    batch_max: usize,
    timeout: Duration,
    backoff: OutboxConfig,
    status: Mutex<Status>,
    /// Rung by the dispatcher after an append.
    appended: Notify,
}

impl Runner {
    fn set_depth(&self) {
        metrics::gauge!("sink_outbox_events", "sink" => self.name.clone()).set(self.outbox.len() as f64);
    }

    fn lag(&self) -> f64 {
        let now = crate::clock::SystemClock.now();
        self.status.lock().oldest_at.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0)
    }
}

/// Every configured sink, running.
pub struct Sinks {
    runners: Vec<Arc<Runner>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Sinks {
    /// Opens the outboxes and starts every sink of `config.events.sinks`; `None` when
    /// there are none. Call before anything publishes (the dispatchers subscribe here).
    pub fn start(config: &Config, bus: &EventBus, sealer: Option<Arc<crate::at_rest::Sealer>>) -> Result<Option<Arc<Sinks>>, String> {
        let cfg = &config.events;
        if cfg.sinks.is_empty() {
            return Ok(None);
        }
        let db = OutboxDb::open(&config.service.data_dir, sealer).map_err(|e| e.to_string())?;
        let (stop, _) = watch::channel(false);
        let mut runners = Vec::new();
        let mut tasks = Vec::new();
        for s in &cfg.sinks {
            let sink = build(s, &config.service.node_id)?;
            let outbox = db.outbox(&s.name, cfg.outbox.max_events).map_err(|e| e.to_string())?;
            let runner = Arc::new(Runner {
                name: s.name.clone(),
                sink,
                outbox,
                batch_max: s.batch_max,
                timeout: s.timeout.0,
                backoff: cfg.outbox.clone(),
                status: Mutex::new(Status { up: None, last_error: None, oldest_at: None }),
                appended: Notify::new(),
            });
            for (name, labels) in [
                ("sink_events_sent_total", None),
                ("sink_delivery_failures_total", None),
                ("sink_events_retried_total", None),
                ("sink_events_dropped_total", Some("outbox_full")),
                ("sink_events_dropped_total", Some("buffer_full")),
            ] {
                match labels {
                    None => metrics::counter!(name, "sink" => s.name.clone()).increment(0),
                    Some(reason) => metrics::counter!(name, "sink" => s.name.clone(), "reason" => reason).increment(0),
                }
            }
            if s.kind == SinkType::Amqp {
                metrics::counter!("sink_events_unroutable_total", "sink" => s.name.clone()).increment(0);
            }
            runner.set_depth();
            metrics::gauge!("sink_lag_seconds", "sink" => s.name.clone()).set(0.0);
            for outcome in ["ok", "failed"] {
                let _ = metrics::histogram!("sink_delivery_seconds", "sink" => s.name.clone(), "outcome" => outcome);
            }
            tracing::info!(sink = %s.name, kind = runner.sink.kind(), queued = runner.outbox.len(), "event sink started");
            tasks.push(tokio::spawn(dispatch(runner.clone(), bus.tap_origin(&s.name, cfg.outbox.buffer), stop.subscribe())));
            tasks.push(tokio::spawn(send(runner.clone(), stop.subscribe())));
            runners.push(runner);
        }
        Ok(Some(Arc::new(Sinks { runners, stop, tasks: Mutex::new(tasks) })))
    }

    pub fn health(&self) -> Vec<SinkHealth> {
        self.runners
            .iter()
            .map(|r| {
                let st = r.status.lock();
                let (up, last_error) = (st.up, st.last_error.clone());
                drop(st);
                SinkHealth {
                    name: r.name.clone(),
                    kind: r.sink.kind(),
                    state: match up {
                        None => "unknown",
                        Some(true) => "up",
                        Some(false) => "down",
                    },
                    outbox_events: r.outbox.len(),
                    lag_seconds: r.lag(),
                    last_error,
                }
            })
            .collect()
    }

    /// Waits, at most `limit`, until every sink that is up has delivered what its outbox
    /// holds (a drained node's last transitions, its users' offline among them, reach the
    /// sinks before it exits when they answer; a sink that is down keeps them queued for
    /// the next start, as always).
    pub async fn settle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        // The dispatchers append what is on the bus in bursts: give them a moment.
        tokio::time::sleep(Duration::from_millis(100).min(limit)).await;
        let waiting = |r: &Arc<Runner>| !r.outbox.is_empty() && r.status.lock().up != Some(false);
        while tokio::time::Instant::now() < deadline && self.runners.iter().any(waiting) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Appends what is still on the bus to the outboxes, then stops (what is not
    /// delivered yet stays queued for the next start).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> = self.tasks.lock().drain(..).collect();
        for t in tasks {
            if tokio::time::timeout(Duration::from_secs(5), t).await.is_err() {
                tracing::warn!("an event sink task did not stop within 5 s");
            }
        }
    }
}

fn build(s: &SinkConfig, node_id: &str) -> Result<Box<dyn EventSink>, String> {
    match s.kind {
        SinkType::Webhook => Ok(Box::new(webhook::Webhook::new(s, node_id)?)),
        SinkType::Amqp => Ok(Box::new(amqp::Amqp::new(s))),
        #[cfg(feature = "kafka")]
        SinkType::Kafka => Ok(Box::new(kafka::Kafka::new(s)?)),
        #[cfg(not(feature = "kafka"))]
        SinkType::Kafka => Err(format!("sink {}: this presenced was built without the kafka feature", s.name)),
    }
}

/// Bus → outbox, in two steps so the bus is never held up by the disk: this task only
/// takes events off the bus and encodes them into a pending list; [`write`] commits that
/// list to the outbox in bursts (one fsync for everything that piled up meanwhile).
async fn dispatch(r: Arc<Runner>, mut rx: mpsc::Receiver<Arc<Event>>, mut stop: watch::Receiver<bool>) {
    let pending: Arc<Mutex<Vec<StoredEvent>>> = Arc::default();
    let more = Arc::new(Notify::new());
    let (done_tx, done_rx) = watch::channel(false);
    let writer = tokio::spawn(write(r.clone(), pending.clone(), more.clone(), done_rx));
    let push = |rec: StoredEvent| {
        let mut p = pending.lock();
        p.push(rec);
        // Beyond what the outbox may hold, the oldest would be dropped there anyway.
        let cap = r.outbox.max_events() as usize;
        if p.len() > cap {
            let excess = p.len() - cap;
            p.drain(..excess);
            metrics::counter!("sink_events_dropped_total", "sink" => r.name.clone(), "reason" => "outbox_full").increment(excess as u64);
        }
    };
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    push(record(&r, &ev));
                    // What else is already waiting, without yielding in between.
                    for _ in 0..APPEND_MAX {
                        match rx.try_recv() {
                            Ok(ev) => push(record(&r, &ev)),
                            Err(_) => break,
                        }
                    }
                    more.notify_one();
                }
                None => break,
            },
            _ = stop.wait_for(|s| *s) => {
                // Whatever is still on the bus goes in too.
                while let Ok(ev) = rx.try_recv() {
                    push(record(&r, &ev));
                }
                break;
            }
        }
    }
    let _ = done_tx.send(true);
    more.notify_one();
    let _ = writer.await;
}

/// Pending list → outbox, until `done` (then one last commit of what is left).
async fn write(r: Arc<Runner>, pending: Arc<Mutex<Vec<StoredEvent>>>, more: Arc<Notify>, mut done: watch::Receiver<bool>) {
    loop {
        let finishing = *done.borrow();
        let records = std::mem::take(&mut *pending.lock());
        if !records.is_empty() {
            let outbox = r.outbox.clone();
            let oldest = records.first().map(|x| x.at);
            match tokio::task::spawn_blocking(move || outbox.append(&records)).await {
                Ok(Ok(dropped)) => {
                    if dropped > 0 {
                        metrics::counter!("sink_events_dropped_total", "sink" => r.name.clone(), "reason" => "outbox_full")
                            .increment(dropped);
                        tracing::warn!(sink = %r.name, dropped, "event outbox full: oldest events dropped");
                    }
                    let mut st = r.status.lock();
                    if st.oldest_at.is_none() {
                        st.oldest_at = oldest;
                    }
                }
                Ok(Err(e)) => tracing::error!(sink = %r.name, error = %e, "events could not be queued; they are lost"),
                Err(e) => tracing::error!(sink = %r.name, error = %e, "outbox append task failed"),
            }
            r.set_depth();
            r.appended.notify_one();
            continue;
        }
        if finishing {
            return;
        }
        tokio::select! {
            _ = more.notified() => {}
            _ = done.changed() => {}
        }
    }
}

fn record(r: &Runner, ev: &Event) -> StoredEvent {
    StoredEvent { user: ev.presence.user_id.to_string(), kind: ev.kind.as_str().to_string(), at: ev.at, body: r.sink.encode(ev) }
}

/// Records the outcome of a check or a delivery; logs a change of state.
fn set_state(r: &Runner, outcome: Result<(), String>) {
    let mut st = r.status.lock();
    match outcome {
        Ok(()) => {
            if st.up == Some(false) {
                tracing::info!(sink = %r.name, "event sink reachable again");
            }
            (st.up, st.last_error) = (Some(true), None);
        }
        Err(e) => {
            if st.up != Some(false) {
                tracing::warn!(sink = %r.name, error = %e, "event sink failing; events wait in the outbox");
            }
            (st.up, st.last_error) = (Some(false), Some(e));
        }
    }
}

/// The sink's check, within its timeout.
async fn check(r: &Runner) -> Result<(), String> {
    match tokio::time::timeout(r.timeout, r.sink.check()).await {
        Ok(o) => o,
        Err(_) => Err(format!("no answer within {:?}", r.timeout)),
    }
}

/// Outbox → sink.
async fn send(r: Arc<Runner>, mut stop: watch::Receiver<bool>) {
    let initial = r.backoff.initial_backoff.0;
    let mut backoff = initial;
    let mut retrying = false;
    // Before the first event: is it there at all?
    tokio::select! {
        first = check(&r) => set_state(&r, first),
        _ = stop.wait_for(|s| *s) => return,
    }
    let mut checked_at = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        let outbox = r.outbox.clone();
        let n = r.batch_max;
        let batch = match tokio::task::spawn_blocking(move || outbox.peek(n)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::error!(sink = %r.name, error = %e, "cannot read the event outbox");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        let Some(last) = batch.last().map(|q| q.seq) else {
            r.status.lock().oldest_at = None;
            metrics::gauge!("sink_lag_seconds", "sink" => r.name.clone()).set(0.0);
            // Down with nothing to deliver: check again (with the backoff) rather than
            // wait for an event to find out.
            if r.status.lock().up == Some(false) && checked_at.elapsed() >= backoff {
                let outcome = check(&r).await;
                backoff = if outcome.is_ok() { initial } else { (backoff * 2).min(r.backoff.max_backoff.0) };
                set_state(&r, outcome);
                checked_at = Instant::now();
            }
            tokio::select! {
                _ = r.appended.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1).min(backoff)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        };
        r.status.lock().oldest_at = batch.first().map(|q| q.record.at);
        metrics::gauge!("sink_lag_seconds", "sink" => r.name.clone()).set(r.lag());
        let started = Instant::now();
        let outcome = match tokio::time::timeout(r.timeout, r.sink.deliver(&batch)).await {
            Ok(o) => o,
            Err(_) => Err(format!("no answer within {:?}", r.timeout)),
        };
        let took = started.elapsed().as_secs_f64();
        let result = if outcome.is_ok() { "ok" } else { "failed" };
        metrics::histogram!("sink_delivery_seconds", "sink" => r.name.clone(), "outcome" => result).record(took);
        match outcome {
            Ok(()) => {
                let outbox = r.outbox.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || outbox.ack(last)).await {
                    tracing::error!(sink = %r.name, error = %e, "cannot remove delivered events from the outbox (they will be sent again)");
                }
                metrics::counter!("sink_events_sent_total", "sink" => r.name.clone()).increment(batch.len() as u64);
                if retrying {
                    metrics::counter!("sink_events_retried_total", "sink" => r.name.clone()).increment(batch.len() as u64);
                }
                set_state(&r, Ok(()));
                r.set_depth();
                (backoff, retrying) = (initial, false);
                tracing::trace!(sink = %r.name, events = batch.len(), took = ?started.elapsed(), "delivered");
            }
            Err(e) => {
                metrics::counter!("sink_delivery_failures_total", "sink" => r.name.clone()).increment(1);
                set_state(&r, Err(e));
                checked_at = Instant::now();
                retrying = true;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(r.backoff.max_backoff.0);
            }
        }
    }
}
