//! The WebSocket upgrade of `GET /ws` (RFC 6455 §4.2; RFC 8441 over HTTP/2), done here
//! rather than by axum's `WebSocketUpgrade` for what is written, and kept, per connection:
//!
//! - A text message longer than [`FRAGMENT`] bytes goes out as several frames of at most
//!   that size (§5.4: every client reassembles them). tungstenite serialises each frame
//!   into a write buffer that keeps the capacity of the largest frame it ever held: one
//!   conversation snapshot of a few KiB made that a few KiB more memory for every idle
//!   connection, for good.
//! - What tungstenite writes is gathered ([`Gather`]) and reaches the socket on flush, in
//!   one write per batch (fragments and all), not one write per message; the gathered
//!   bytes are let go once sent.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Largest frame a text message is sent in (payload bytes).
pub const FRAGMENT: usize = 256;

/// Gathered bytes past which a write waits for the socket (backpressure).
const GATHER_MAX: usize = 64 << 10;

/// Why a request cannot be upgraded (each a 400 in the JSON envelope, by the caller).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the method must be GET (HTTP/1.1) or CONNECT (HTTP/2)")]
    Method,
    #[error("the Connection header must include 'upgrade'")]
    Connection,
    #[error("the Upgrade header must be 'websocket'")]
    UpgradeHeader,
    #[error("the :protocol pseudo-header must be 'websocket'")]
    Protocol,
    #[error("the Sec-WebSocket-Key header is missing")]
    Key,
    #[error("the Sec-WebSocket-Version header must be 13")]
    Version,
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        crate::error::ApiError::BadRequest(format!("GET /ws needs a WebSocket upgrade request: {self}")).into_response()
    }
}

/// An upgrade request, checked: answered by [`Upgrade::on_upgrade`].
pub struct Upgrade {
    key: Option<HeaderValue>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
}

fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
}

fn is(h: &HeaderMap, name: HeaderName, value: &str) -> bool {
    h.get(name).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Upgrade, Refused> {
        let key = if parts.version <= Version::HTTP_11 {
            if parts.method != Method::GET {
                return Err(Refused::Method);
            }
            if !has_token(&parts.headers, header::CONNECTION, "upgrade") {
                return Err(Refused::Connection);
            }
            if !is(&parts.headers, header::UPGRADE, "websocket") {
                return Err(Refused::UpgradeHeader);
            }
            Some(parts.headers.get(header::SEC_WEBSOCKET_KEY).ok_or(Refused::Key)?.clone())
        } else {
            if parts.method != Method::CONNECT {
                return Err(Refused::Method);
            }
            if parts.extensions.get::<hyper::ext::Protocol>().is_none_or(|p| p.as_str() != "websocket") {
                return Err(Refused::Protocol);
            }
            None
        };
        if !is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(Refused::Version);
        }
        let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>().ok_or(Refused::NotUpgradable)?;
        Ok(Upgrade { key, on_upgrade, config: WebSocketConfig::default() })
    }
}

impl Upgrade {
    /// The connection's limits (tungstenite's: read buffer, message and frame size).
    pub fn config(mut self, config: WebSocketConfig) -> Upgrade {
        self.config = config;
        self
    }

    /// The switching response; once the client has it, `run` gets the socket (`failed`
    /// instead when the upgrade breaks off).
    pub fn on_upgrade<F, R>(self, failed: impl FnOnce(hyper::Error) + Send + 'static, run: F) -> Response
    where
        F: FnOnce(WsSocket) -> R + Send + 'static,
        R: Future<Output = ()> + Send + 'static,
    {
        let Upgrade { key, on_upgrade, config } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => return failed(e),
            };
            let io = Gather { io: TokioIo::new(upgraded), buf: Vec::new(), sent: 0 };
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            run(WsSocket { ws }).await;
        });
        match key {
            Some(key) => (
                StatusCode::SWITCHING_PROTOCOLS,
                [
                    (header::CONNECTION, HeaderValue::from_static("upgrade")),
                    (header::UPGRADE, HeaderValue::from_static("websocket")),
                    (
                        header::SEC_WEBSOCKET_ACCEPT,
                        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap_or(HeaderValue::from_static("")),
                    ),
                ],
            )
                .into_response(),
            // RFC 8441: the extended CONNECT is answered 200.
            None => StatusCode::OK.into_response(),
        }
    }
}

/// The socket under the WebSocket: what tungstenite writes is kept until a flush, then
/// written at once and let go.
pub struct Gather<S> {
    io: S,
    buf: Vec<u8>,
    sent: usize,
}

impl<S: AsyncWrite + Unpin> Gather<S> {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        // Let go between batches: an idle connection keeps no write buffer of its own.
        (self.sent, self.buf) = (0, Vec::new());
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gather<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gather<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.buf.len() >= GATHER_MAX {
            ready!(self.poll_send(cx))?;
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A server WebSocket whose long text messages go out in [`FRAGMENT`]-byte frames.
pub struct WsSocket {
    ws: WebSocketStream<Gather<TokioIo<hyper::upgrade::Upgraded>>>,
}

/// `data` (longer than [`FRAGMENT`]) as the frames of one text message.
fn frames(mut data: Bytes) -> impl Iterator<Item = Frame> {
    let mut first = true;
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let part = data.split_to(data.len().min(FRAGMENT));
        let opcode = if std::mem::take(&mut first) { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
        Some(Frame::message(part, opcode, data.is_empty()))
    })
}

impl Stream for WsSocket {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.ws).poll_next(cx)
    }
}

impl Sink<Message> for WsSocket {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.ws).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        match item {
            Message::Text(t) if t.len() > FRAGMENT => {
                // Accepted whole (tungstenite queues what the socket has no room for).
                for f in frames(Bytes::from(t)) {
                    Pin::new(&mut self.ws).start_send(Message::Frame(f))?;
                }
                Ok(())
            }
            m => Pin::new(&mut self.ws).start_send(m),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.ws).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        ready!(Pin::new(&mut self.ws).poll_close(cx))?;
        // tungstenite leaves its last frame (the reply to a peer's close) written but not
        // flushed: it reaches the socket here.
        Pin::new(self.ws.get_mut()).poll_flush(cx).map_err(WsError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long text message goes out as frames of at most [`FRAGMENT`] bytes: the first a
    /// text frame, the others continuations, only the last final, the bytes in order.
    #[test]
    fn a_long_message_is_cut_into_frames_that_join_up() {
        let text: String = (0..FRAGMENT * 3 + 17).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let out: Vec<Frame> = frames(Bytes::from(text.clone())).collect();
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|f| f.payload().len() <= FRAGMENT));
        assert_eq!(out[0].header().opcode, OpCode::Data(Data::Text));
        assert!(out[1..].iter().all(|f| f.header().opcode == OpCode::Data(Data::Continue)));
        assert_eq!(out.iter().map(|f| f.header().is_final).collect::<Vec<_>>(), [false, false, false, true]);
        let joined: Vec<u8> = out.iter().flat_map(|f| f.payload().to_vec()).collect();
        assert_eq!(joined, text.as_bytes());
        // Exactly a multiple of the size: no empty frame at the end.
        let out: Vec<Frame> = frames(Bytes::from(vec![b'x'; FRAGMENT * 2])).collect();
        assert_eq!(out.len(), 2);
        assert!(out[1].header().is_final && out[1].payload().len() == FRAGMENT);
    }

    /// What is written waits for the flush, goes out whole, and is not kept.
    #[tokio::test]
    async fn gathered_bytes_go_out_on_flush_and_are_let_go() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut g = Gather { io: a, buf: Vec::new(), sent: 0 };
        g.write_all(&[1u8; 3000]).await.unwrap();
        g.write_all(&[2u8; 10]).await.unwrap();
        let mut got = [0u8; 1];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut got)).await;
        assert!(early.is_err(), "nothing reaches the socket before the flush");
        g.flush().await.unwrap();
        let mut all = vec![0u8; 3010];
        b.read_exact(&mut all).await.unwrap();
        assert!(all[..3000].iter().all(|x| *x == 1) && all[3000..].iter().all(|x| *x == 2));
        assert_eq!(g.buf.capacity(), 0, "the bytes are let go once sent");
    }
}
