//! Accepting connections: the per-connection timeouts that stop a client from holding a
//! socket without using it, and the HTTP accept loop (the gRPC listener uses the same
//! parts through [`grpc_incoming`]).
//!
//! Every accepted socket is wrapped in [`TimedIo`], which shares an [`Activity`] with the
//! request service of its connection:
//! - **header read timeout** (`limits.header_read_timeout`): a new connection must send
//!   a whole request head (HTTP/2: open a stream) within it, and so must a keep-alive
//!   connection once the first byte of its next request arrived. A client sending half a
//!   request line and stalling is cut off.
//! - **idle timeout** (`limits.idle_timeout`): a connection with no request in flight for
//!   this long is closed (for gRPC: no open stream; a stream that waits for events is in
//!   flight).
//!
//! While a request is in flight, or once a connection was upgraded to a WebSocket, the
//! wrapper applies no timeout at all: WebSockets have their own heartbeat.
//!
//! With `service.tls`, [`tls`] refuses plain text and runs the handshake over the
//! wrapper, so the handshake is bounded like a request head.

pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::config::LimitsConfig;
use crate::service::KeyedLimiter;
use tls::{Conn, Port, Tls};

/// How long a connection over the per-IP rate stays open (its calls are refused).
const LIMITED_GRACE: Duration = Duration::from_secs(1);

/// The two timeouts of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
}

impl Timeouts {
    pub fn of(l: &LimitsConfig) -> Timeouts {
        Timeouts { header_read: l.header_read_timeout.0, idle: l.idle_timeout.0 }
    }
}

/// What a connection's requests tell its socket wrapper.
pub struct Activity {
    start: Instant,
    /// HTTP/2 only (gRPC): bytes between streams are pings and settings, not a request.
    h2: bool,
    /// Over the per-IP connection rate: answered (every call refused), then closed soon.
    limited: bool,
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
    /// A request was seen on this connection.
    served: AtomicBool,
    /// Milliseconds after `start` at which the connection last became idle, and at which
    /// the first byte arrived since (`u64::MAX`: none yet).
    idle_since: AtomicU64,
    first_byte: AtomicU64,
    waker: AtomicWaker,
}

impl Activity {
    fn new(h2: bool, limited: bool) -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            h2,
            limited,
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(u64::MAX),
            waker: AtomicWaker::new(),
        })
    }

    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A request (stream) started.
    pub fn begin(&self) {
        self.served.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A request (stream) ended: when none is left, the idle clock starts.
    pub fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.ms(), Ordering::Release);
            self.first_byte.store(u64::MAX, Ordering::Release);
            // The socket's pending read must look at the new deadline.
            self.waker.wake();
        }
    }

    /// The connection became a WebSocket: no more timeouts here.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    fn on_bytes(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let now = self.ms();
            let _ = self.first_byte.compare_exchange(u64::MAX, now, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// When the connection must be closed if nothing changes; `None` while a request is
    /// in flight or after an upgrade.
    fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        if self.limited {
            // Long enough to tell the client why; it must not hold the socket.
            return Some(self.start + t.header_read.min(LIMITED_GRACE));
        }
        if self.upgraded.load(Ordering::Acquire) || self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, d: Duration| self.start + Duration::from_millis(ms) + d;
        if !self.served.load(Ordering::Acquire) {
            return Some(at(0, t.header_read));
        }
        let first = self.first_byte.load(Ordering::Acquire);
        if !self.h2 && first != u64::MAX {
            return Some(at(first, t.header_read));
        }
        Some(at(self.idle_since.load(Ordering::Acquire), t.idle))
    }
}

/// A socket whose reads fail with `TimedOut` once its [`Activity`] says so.
pub struct TimedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    sleep: Option<Pin<Box<Sleep>>>,
    meta: ConnMeta,
}

/// What the request service learns about its connection (gRPC: a request extension).
#[derive(Clone)]
pub struct ConnMeta {
    pub remote: SocketAddr,
    pub activity: Arc<Activity>,
    /// The peer went over the per-IP connection rate: every call is refused.
    pub limited: bool,
}

impl<T> TimedIo<T> {
    fn new(inner: T, remote: SocketAddr, timeouts: Timeouts, h2: bool, limited: bool) -> TimedIo<T> {
        let activity = Activity::new(h2, limited);
        TimedIo { inner, activity: activity.clone(), timeouts, sleep: None, meta: ConnMeta { remote, activity, limited } }
    }

    pub fn meta(&self) -> &ConnMeta {
        &self.meta
    }
}

fn timed_out(t: &Timeouts, a: &Activity) -> io::Error {
    let (reason, d) = if a.limited {
        ("rate_limited", LIMITED_GRACE)
    } else if a.served.load(Ordering::Acquire) && (a.h2 || a.first_byte.load(Ordering::Acquire) == u64::MAX) {
        ("idle", t.idle)
    } else {
        ("header_read", t.header_read)
    };
    metrics::counter!("connections_timed_out_total", "reason" => reason).increment(1);
    io::Error::new(io::ErrorKind::TimedOut, format!("connection closed: {reason} timeout ({d:?})"))
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.on_bytes();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        this.activity.waker.register(cx.waker());
        let Some(deadline) = this.activity.deadline(&this.timeouts) else {
            this.sleep = None;
            return Poll::Pending;
        };
        if Instant::now() >= deadline {
            return Poll::Ready(Err(timed_out(&this.timeouts, &this.activity)));
        }
        match &mut this.sleep {
            Some(s) if s.deadline() == deadline => {}
            Some(s) => s.as_mut().reset(deadline),
            None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        match this.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(timed_out(&this.timeouts, &this.activity))),
            _ => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts with back-off on errors such as EMFILE (out of file descriptors), which would
/// otherwise spin: the listener stays, connections wait in the backlog.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                metrics::counter!("accept_errors_total").increment(1);
                tracing::warn!(error = %e, "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The gRPC listener's connections: TCP_NODELAY (a 100-id answer must not wait for the
/// client's delayed ACK), the timeouts (HTTP/2 rules), the per-IP rate limit (a peer over
/// it is accepted, so that it can be told `RESOURCE_EXHAUSTED`, see [`GrpcConnLayer`]),
/// and TLS when configured (handshakes run beside the accept loop, so a slow one holds
/// up no other). The accept loop ends, closing the port, when the stream is dropped.
pub fn grpc_incoming(
    listener: TcpListener,
    timeouts: Timeouts,
    limiter: Option<KeyedLimiter>,
    clock: Arc<dyn crate::clock::Clock>,
    tls: Option<Arc<Tls>>,
) -> impl futures_util::Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                c = accept(&listener) => c,
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let limited = limiter.as_ref().is_some_and(|l| l.check(&peer.ip().to_string(), clock.now()).is_err());
            if limited {
                metrics::counter!("presence_rate_limited_total", "scope" => "grpc_connect").increment(1);
            }
            let io = TimedIo::new(tcp, peer, timeouts, true, limited);
            match &tls {
                None => {
                    if tx.send(Ok(Conn::Plain(io))).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let (tls, tx) = (tls.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Some(conn) = tls::secure(io, Some(&tls), Port::Grpc, timeouts.header_read).await {
                            let _ = tx.send(Ok(conn)).await;
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` resolves; then
/// stops accepting and waits for in-flight HTTP requests (upgraded WebSockets are on
/// their own by then). The caller bounds that wait.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    timeouts: Timeouts,
    tls: Option<Arc<Tls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Timeouts are the wrapper's (they must not apply to upgraded connections).
    builder.http1().header_read_timeout(None);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            c = accept(&listener) => c,
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let io = TimedIo::new(tcp, peer, timeouts, false, false);
        let activity = io.activity.clone();
        let router = router.clone();
        let svc = hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            activity.begin();
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            let activity = activity.clone();
            let call = router.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                let resp = match call.await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                if resp.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
                    activity.upgraded();
                }
                activity.end();
                Ok::<_, Infallible>(resp)
            }
        });
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let Some(io) = tls::secure(io, tls.as_deref(), Port::Http, timeouts.header_read).await else { return };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// gRPC per-call layer: counts calls in flight on the connection (a streaming call until
/// its response body ends), and refuses every call of a connection over the per-IP rate.
#[derive(Clone, Default)]
pub struct GrpcConnLayer;

impl<S> tower::Layer<S> for GrpcConnLayer {
    type Service = GrpcConn<S>;
    fn layer(&self, inner: S) -> GrpcConn<S> {
        GrpcConn { inner }
    }
}

#[derive(Clone)]
pub struct GrpcConn<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcConn<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let meta = req.extensions().get::<ConnMeta>().cloned();
        if meta.as_ref().is_some_and(|m| m.limited) {
            let status = tonic::Status::resource_exhausted("too many new connections from this address: slow down and reuse connections");
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let guard = meta.map(|m| InFlight::new(m.activity));
        // The ready service answers this call; a fresh clone takes the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(match guard {
                None => resp,
                Some(g) => resp.map(|body| tonic::body::Body::new(GuardedBody { inner: body, _guard: g })),
            })
        })
    }
}

/// Holds a call in flight until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> InFlight {
        a.begin();
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its call counted as in flight until it is done.
struct GuardedBody {
    inner: tonic::body::Body,
    _guard: InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_requests() {
        let t = Timeouts { header_read: Duration::from_secs(10), idle: Duration::from_secs(60) };
        let a = Activity::new(false, false);
        let start = a.start;
        assert_eq!(a.deadline(&t), Some(start + Duration::from_secs(10)), "a new connection must send a request soon");
        a.begin();
        assert_eq!(a.deadline(&t), None, "no timeout while a request is in flight");
        tokio::time::advance(Duration::from_secs(30)).await;
        a.end();
        assert_eq!(a.deadline(&t), Some(start + Duration::from_secs(90)), "idle keep-alive");
        tokio::time::advance(Duration::from_secs(5)).await;
        a.on_bytes();
        assert_eq!(a.deadline(&t), Some(start + Duration::from_secs(45)), "a started request head must complete");
        a.upgraded();
        assert_eq!(a.deadline(&t), None, "WebSockets have their own heartbeat");
        // HTTP/2: bytes between streams (pings) do not start the header clock.
        let h2 = Activity::new(true, false);
        h2.begin();
        h2.end();
        h2.on_bytes();
        assert_eq!(h2.deadline(&t), Some(h2.start + Duration::from_secs(60)));
        // Over the per-IP rate: closed a second after it was accepted, calls or not.
        let limited = Activity::new(true, true);
        limited.begin();
        assert_eq!(limited.deadline(&t), Some(limited.start + LIMITED_GRACE));
    }
}
