//! The audit log (`logging.audit_file`): one JSON line per change of someone's presence
//! data, for "who changed this, when, from where".
//!
//! Each line: `time` (RFC 3339, ms), `actor` (`sub`, `admin`: whether it used the admin
//! scope, `gateway`: whether it was trusted from the gateway's `X-User-ID`), `user` (whose
//! data changed; `conversation` for members), `action`, `transport` (`http`, `ws`,
//! `grpc`), `peer` (the client's address), `node`, and `change` (what it became). Never a
//! token or a header.
//!
//! Requests never wait for the file: a line is formatted by the caller and handed to a
//! writer thread, which writes in batches and flushes whenever it has nothing left to
//! write (so a line is on disk within moments, and at shutdown). SIGHUP makes it reopen
//! the file (after logrotate moved it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::auth::Identity;

enum Msg {
    Line(String),
    Reopen,
    /// Flush, then answer.
    Flush(mpsc::Sender<()>),
    Close,
}

/// The audit log's handle; cheap to clone. Off: every call is a no-op.
#[derive(Clone, Default)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: Mutex<mpsc::Sender<Msg>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    node: Arc<str>,
}

#[derive(Serialize)]
struct Actor<'a> {
    sub: &'a str,
    admin: bool,
    gateway: bool,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    actor: Actor<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    action: &'a str,
    transport: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    node: &'a str,
    change: serde_json::Value,
}

/// What a change is about: a user's data, a conversation's, or a gateway instance.
pub enum Subject<'a> {
    User(&'a str),
    Conversation(&'a str),
    Instance(&'a str),
}

impl Audit {
    /// Opens (appends to) `path`, or returns the disabled handle when `path` is `None`.
    pub fn open(path: Option<&Path>, node: &str) -> Result<Audit, String> {
        let Some(path) = path else { return Ok(Audit::default()) };
        let file = open_file(path)?;
        let (tx, rx) = mpsc::channel();
        let owned = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer(owned, file, rx))
            .map_err(|e| format!("logging.audit_file: cannot start its writer: {e}"))?;
        let inner = Arc::new(Inner { tx: Mutex::new(tx), thread: Mutex::new(Some(thread)), node: Arc::from(node) });
        Ok(Audit { inner: Some(inner) })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Records that `who` did `action` to `subject` (`change`: what it became).
    pub fn record(&self, who: &Identity, subject: Subject<'_>, action: &str, change: serde_json::Value) {
        let Some(inner) = &self.inner else { return };
        let (user, conversation, instance) = match subject {
            Subject::User(u) => (Some(u), None, None),
            Subject::Conversation(c) => (None, Some(c), None),
            Subject::Instance(i) => (None, None, Some(i)),
        };
        let line = Line {
            time: now_rfc3339(),
            actor: Actor { sub: &who.sub, admin: who.is_admin(), gateway: who.origin.gateway },
            user,
            conversation,
            instance,
            action,
            transport: who.origin.transport,
            peer: who.origin.peer.map(|p| p.to_string()),
            node: &inner.node,
            change,
        };
        match serde_json::to_string(&line) {
            Ok(text) => {
                if inner.tx.lock().send(Msg::Line(text)).is_err() {
                    metrics::counter!("audit_lines_lost_total").increment(1);
                }
            }
            Err(e) => tracing::error!(error = %e, "audit line not encodable"),
        }
    }

    /// Reopens the file (after the operator moved it away).
    pub fn reopen(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.tx.lock().send(Msg::Reopen);
        }
    }

    /// Waits until every line recorded so far is written and flushed.
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            let (tx, rx) = mpsc::channel();
            if inner.tx.lock().send(Msg::Flush(tx)).is_ok() {
                let _ = rx.recv_timeout(std::time::Duration::from_secs(5));
            }
        }
    }

    /// Writes what is left, flushes and stops the writer. Idempotent.
    pub fn close(&self) {
        if let Some(inner) = &self.inner {
            let _ = inner.tx.lock().send(Msg::Close);
            if let Some(t) = inner.thread.lock().take() {
                let _ = t.join();
            }
        }
    }

    /// Reopens the file on every SIGHUP while the handle lives (call inside a runtime).
    pub fn reopen_on_sighup(&self) {
        if !self.enabled() {
            return;
        }
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let weak = self.inner.as_ref().map(Arc::downgrade);
            match signal(SignalKind::hangup()) {
                Ok(mut hup) => {
                    tokio::spawn(async move {
                        while hup.recv().await.is_some() {
                            let Some(inner) = weak.as_ref().and_then(|w| w.upgrade()) else { return };
                            tracing::info!("SIGHUP: reopening logging.audit_file");
                            Audit { inner: Some(inner) }.reopen();
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP: logging.audit_file is not reopened on it"),
            }
        }
    }
}

/// Opens `path` for appending; a new file is readable by its owner only (it names users
/// and holds their messages).
fn open_file(path: &Path) -> Result<std::fs::File, String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).map_err(|e| format!("logging.audit_file: cannot open {}: {e}", path.display()))
}

fn writer(path: PathBuf, file: std::fs::File, rx: mpsc::Receiver<Msg>) {
    let mut out = std::io::BufWriter::new(file);
    let write = |out: &mut std::io::BufWriter<std::fs::File>, line: &str| {
        if let Err(e) = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")) {
            metrics::counter!("audit_lines_lost_total").increment(1);
            tracing::error!(error = %e, path = %path.display(), "audit line not written");
        }
    };
    loop {
        // Block for the next message, then take everything queued before flushing.
        let Ok(first) = rx.recv() else { break };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(l) => write(&mut out, &l),
                Msg::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
                Msg::Reopen => {
                    let _ = out.flush();
                    match open_file(&path) {
                        Ok(f) => out = std::io::BufWriter::new(f),
                        Err(e) => tracing::error!(error = %e, "audit log not reopened; still writing the old file"),
                    }
                }
                Msg::Close => {
                    let _ = out.flush();
                    let _ = out.get_ref().sync_all();
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, path = %path.display(), "audit log flush failed");
        }
    }
    let _ = out.flush();
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
