//! TLS on the node's own ports (`service.tls`), with rustls (ring).
//!
//! - The HTTP port becomes HTTPS and WSS (ALPN `http/1.1`); the gRPC port becomes
//!   gRPC over TLS (ALPN `h2`), and with `client_ca_file` it requires a client
//!   certificate signed by one of those CAs (mTLS for gateways).
//! - Plain text on a TLS port is refused before any handshake: a connection whose first
//!   byte is not a TLS handshake record is answered `400` in plain HTTP on the HTTP port
//!   (a person who typed `http://` learns why) and closed on the gRPC port.
//! - The files are read again every `reload_interval`: a changed certificate, key or CA
//!   is used for the next handshakes (connections already open keep theirs). A set of
//!   files that does not load (a half-written rotation, a key that does not match) is
//!   logged and counted, and the previous configuration kept until the files change again.
//! - The handshake runs inside the socket's [`TimedIo`], so it is bounded by
//!   `limits.header_read_timeout` like a request head.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{ConnMeta, TimedIo};
use crate::config::TlsConfig;

/// A TLS setting that cannot be used; at start it stops the node (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("service.tls: cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("service.tls: {}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("service.tls: {reason}")]
    Setup { reason: String },
}

/// Which port a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Http,
    Grpc,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Http => "http",
            Port::Grpc => "grpc",
        }
    }
}

/// The bytes of the files last read (a change of content, however it happened: a
/// rename, a symlink swap, a write in place, triggers a reload).
#[derive(PartialEq, Eq, Default)]
struct Seen {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

/// The files of `service.tls`.
struct Files {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

/// The node's TLS configurations, reloaded when their files change.
pub struct Tls {
    files: Files,
    http: RwLock<TlsAcceptor>,
    grpc: RwLock<TlsAcceptor>,
    seen: Mutex<Seen>,
}

impl Tls {
    /// Loads `service.tls`; `None` when it is off.
    pub fn load(cfg: &TlsConfig) -> Result<Option<Arc<Tls>>, TlsError> {
        let (Some(cert_file), Some(key_file)) = (&cfg.cert_file, &cfg.key_file) else { return Ok(None) };
        let files = Files { cert_file: cert_file.clone(), key_file: key_file.clone(), client_ca_file: cfg.client_ca_file.clone() };
        let seen = files.read()?;
        let (http, grpc) = files.build(&seen)?;
        Ok(Some(Arc::new(Tls { files, http: RwLock::new(http), grpc: RwLock::new(grpc), seen: Mutex::new(seen) })))
    }

    /// Reads the files again every `interval` while `self` lives.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        let me: Weak<Tls> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(tls) = me.upgrade() else { return };
                // Small files, read off the runtime's threads all the same.
                let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
            }
        });
    }

    /// Reads the files; if their content changed, builds and swaps in new configurations.
    /// Returns whether it did.
    pub fn reload(&self) -> bool {
        let seen = match self.files.read() {
            Ok(s) => s,
            Err(e) => {
                metrics::counter!("tls_reload_failures_total").increment(1);
                tracing::warn!(error = %e, "TLS files unreadable; keeping the current certificate");
                return false;
            }
        };
        let mut last = self.seen.lock();
        if *last == seen {
            return false;
        }
        let built = self.files.build(&seen);
        // Tried once per content: a failing set is not retried until the files change.
        *last = seen;
        drop(last);
        match built {
            Ok((http, grpc)) => {
                *self.http.write() = http;
                *self.grpc.write() = grpc;
                metrics::counter!("tls_reloads_total").increment(1);
                tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded; new connections use it");
                true
            }
            Err(e) => {
                metrics::counter!("tls_reload_failures_total").increment(1);
                tracing::warn!(error = %e, "new TLS files do not load; keeping the current certificate");
                false
            }
        }
    }

    fn acceptor(&self, port: Port) -> TlsAcceptor {
        match port {
            Port::Http => self.http.read().clone(),
            Port::Grpc => self.grpc.read().clone(),
        }
    }
}

impl Files {
    fn read(&self) -> Result<Seen, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| TlsError::Read { path: p.to_path_buf(), reason: e.to_string() });
        Ok(Seen { cert: read(&self.cert_file)?, key: read(&self.key_file)?, ca: self.client_ca_file.as_deref().map(read).transpose()? })
    }

    fn build(&self, seen: &Seen) -> Result<(TlsAcceptor, TlsAcceptor), TlsError> {
        let pem = |path: &Path, reason: String| TlsError::Pem { path: path.to_path_buf(), reason };
        let certs = CertificateDer::pem_slice_iter(&seen.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem(&self.cert_file, format!("not a PEM certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(pem(&self.cert_file, "holds no CERTIFICATE block".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&seen.key).map_err(|e| pem(&self.key_file, format!("no PEM private key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = || {
            ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Setup { reason: e.to_string() })
        };
        let mismatch =
            |e: rustls::Error| pem(&self.key_file, format!("does not go with the certificate of {}: {e}", self.cert_file.display()));
        let mut http = versions()?.with_no_client_auth().with_single_cert(certs.clone(), key.clone_key()).map_err(mismatch)?;
        // HTTP/1.1 only: the HTTP port's timeouts follow HTTP/1 (WebSockets upgrade over it
        // anyway); HTTP/2 frames between requests would count as a request head starting.
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        let grpc = versions()?;
        let mut grpc = match (&self.client_ca_file, &seen.ca) {
            (Some(path), Some(bytes)) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(bytes) {
                    let c = c.map_err(|e| pem(path, format!("not a PEM certificate: {e}")))?;
                    roots.add(c).map_err(|e| pem(path, format!("not a CA certificate: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(pem(path, "holds no CERTIFICATE block".into()));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| pem(path, e.to_string()))?;
                grpc.with_client_cert_verifier(verifier)
            }
            _ => grpc.with_no_client_auth(),
        }
        .with_single_cert(certs, key)
        .map_err(mismatch)?;
        grpc.alpn_protocols = vec![b"h2".to_vec()];
        Ok((TlsAcceptor::from(Arc::new(http)), TlsAcceptor::from(Arc::new(grpc))))
    }
}

/// An accepted connection: plain, or TLS once its handshake is done.
pub enum Conn {
    Plain(TimedIo<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<TimedIo<TcpStream>>>),
}

impl Conn {
    pub fn meta(&self) -> &ConnMeta {
        match self {
            Conn::Plain(io) => io.meta(),
            Conn::Tls(s) => s.get_ref().0.meta(),
        }
    }
}

/// What a plain-text request on the HTTPS port is told before the socket closes.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\
Content-Length: 59\r\n\r\nThis port speaks TLS only: use https:// or wss:// instead.\n";

/// Turns an accepted socket into a [`Conn`]: as it is without TLS, else after refusing
/// plain text and completing the handshake. `None`: the connection is done with.
pub async fn secure(io: TimedIo<TcpStream>, tls: Option<&Tls>, port: Port, header_read: Duration) -> Option<Conn> {
    let Some(tls) = tls else { return Some(Conn::Plain(io)) };
    let fail =
        |reason: &'static str| metrics::counter!("tls_handshake_failures_total", "port" => port.name(), "reason" => reason).increment(1);
    let mut first = [0u8; 1];
    match tokio::time::timeout(header_read, io.inner.peek(&mut first)).await {
        Ok(Ok(1..)) => {}
        Ok(_) => return None, // closed (or failed) before a byte
        Err(_) => {
            fail("timeout");
            return None;
        }
    }
    // 0x16: a TLS handshake record (a ClientHello comes first).
    if first[0] != 0x16 {
        fail("plain_text");
        if port == Port::Http {
            let mut tcp = io.inner;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = tcp.write_all(PLAIN_ON_TLS).await;
                let _ = tcp.shutdown().await;
            })
            .await;
        }
        return None;
    }
    match tls.acceptor(port).accept(io).await {
        Ok(s) => Some(Conn::Tls(Box::new(s))),
        Err(e) => {
            fail("handshake");
            tracing::debug!(error = %e, port = port.name(), "TLS handshake failed");
            None
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnMeta;
    fn connect_info(&self) -> ConnMeta {
        self.meta().clone()
    }
}
