//! A minimal RFC 6455 client for the scale generators, which hold up to 19,000 sessions
//! per process. tokio-tungstenite keeps its read chunk, write buffer and frame state per
//! connection (about 10 KiB per idle client, measured); this one keeps a TCP stream and
//! a leftover buffer that is empty, and freed, between frames. It reads into a stack
//! buffer that lives only while a read is being parsed.
//!
//! Only what the generators use: text frames out (masked, as a client must), text, ping
//! and close frames in; a ping is answered with a pong.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

type Res<T> = Result<T, String>;

pub struct LeanWs {
    stream: TcpStream,
    /// Bytes of a frame not complete yet; empty (no allocation) when idle.
    partial: Vec<u8>,
    /// A fragmented text message so far (the server sends long ones in frames); empty
    /// (no allocation) between messages.
    message: Vec<u8>,
}

/// What a read brought in besides text frames.
pub enum Read {
    Open,
    Closed,
}

impl LeanWs {
    /// Connects from `source`, upgrades `/ws` with the gateway headers when `user` is
    /// given, and keeps whatever the server sent after the 101 (the `connected` frame).
    pub async fn connect(addr: SocketAddr, source: Ipv4Addr, user: Option<&str>) -> Res<LeanWs> {
        let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).map_err(|e| format!("bind {source}: {e}"))?;
        let mut stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let headers = match user {
            Some(u) => format!("X-User-Id: {u}\r\nX-Device-Id: bench\r\n"),
            None => String::new(),
        };
        // The key is not secret and the server does not check its randomness; the bench
        // does not check the accept hash either (a 101 is what matters here).
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("handshake: {e}"))?;
        // On the heap, so the handshake's buffer is not part of every client's future.
        let mut got = Vec::with_capacity(512);
        let end = loop {
            if got.len() > 16 * 1024 {
                return Err("handshake: answer too long".into());
            }
            let n = stream.read_buf(&mut got).await.map_err(|e| format!("handshake: {e}"))?;
            if n == 0 {
                return Err("handshake: closed".into());
            }
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let status = got.split(|&b| b == b'\n').next().unwrap_or_default();
        if !status.starts_with(b"HTTP/1.1 101") {
            return Err(format!("handshake: {}", String::from_utf8_lossy(status).trim()));
        }
        let partial = got[end..].to_vec();
        Ok(LeanWs { stream, partial, message: Vec::new() })
    }

    /// Sends one text frame.
    pub async fn send_text(&mut self, text: &str) -> Res<()> {
        self.send(0x1, text.as_bytes()).await
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Res<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.map_err(|e| e.to_string())
    }

    /// Frames that arrived with the handshake answer (call once after `connect`).
    pub async fn drain_buffered(&mut self, on_text: &mut impl FnMut(&[u8])) -> Res<Read> {
        let (read, pongs) = self.parse(&[], on_text);
        self.answer(read, pongs).await
    }

    /// Waits until the socket is readable. Cancel-safe: use it as a `select!` branch and
    /// call [`LeanWs::on_readable`] in the branch's handler.
    pub async fn readable(&self) -> Res<()> {
        self.stream.readable().await.map_err(|e| e.to_string())
    }

    /// Reads what is there, hands every complete text frame to `on_text`, answers pings.
    pub async fn on_readable(&mut self, on_text: &mut impl FnMut(&[u8])) -> Res<Read> {
        let (read, pongs) = self.read_now(on_text)?;
        self.answer(read, pongs).await
    }

    async fn answer(&mut self, read: Read, pongs: Vec<Vec<u8>>) -> Res<Read> {
        for p in pongs {
            self.send(0xA, &p).await?;
        }
        Ok(read)
    }

    /// Synchronous, so the read buffer is on this call's stack and never part of a
    /// client's future.
    fn read_now(&mut self, on_text: &mut impl FnMut(&[u8])) -> Res<(Read, Vec<Vec<u8>>)> {
        let mut buf = [0u8; 16 * 1024];
        match self.stream.try_read(&mut buf) {
            Ok(0) => Ok((Read::Closed, Vec::new())),
            Ok(n) => Ok(self.parse(&buf[..n], on_text)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok((Read::Open, Vec::new())),
            Err(e) => Err(e.to_string()),
        }
    }

    fn parse(&mut self, fresh: &[u8], on_text: &mut impl FnMut(&[u8])) -> (Read, Vec<Vec<u8>>) {
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        let mut closed = false;
        let data: Vec<u8>;
        let bytes: &[u8] = if self.partial.is_empty() {
            fresh
        } else {
            self.partial.extend_from_slice(fresh);
            data = std::mem::take(&mut self.partial);
            &data
        };
        let mut at = 0;
        while let Some((opcode, payload, next)) = frame(&bytes[at..]) {
            let fin = bytes[at] & 0x80 != 0;
            match opcode {
                0x1 if fin => on_text(payload),
                0x1 => self.message = payload.to_vec(),
                0x0 => {
                    self.message.extend_from_slice(payload);
                    if fin {
                        on_text(&std::mem::take(&mut self.message));
                    }
                }
                0x8 => closed = true,
                0x9 => pongs.push(payload.to_vec()),
                _ => {}
            }
            at += next;
        }
        // What is left waits for the next read; nothing is kept when a read ended on a
        // frame boundary, so an idle client holds no buffer.
        self.partial = bytes[at..].to_vec();
        (if closed { Read::Closed } else { Read::Open }, pongs)
    }

    /// Sends a close frame and shuts the write side.
    pub async fn close(mut self) {
        let _ = self.send(0x8, &1000u16.to_be_bytes()).await;
        let _ = self.stream.shutdown().await;
    }
}

/// One complete server frame at the start of `b`: (opcode, payload, its length in bytes).
fn frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    let opcode = b.first()? & 0x0F;
    let second = *b.get(1)?;
    let masked = second & 0x80 != 0;
    let (len, mut at): (usize, usize) = match second & 0x7F {
        126 => (u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    if masked {
        at += 4; // servers do not mask; skipped rather than trusted
    }
    let end = at.checked_add(len)?;
    Some((opcode, b.get(at..end)?, end))
}

#[cfg(test)]
mod tests {
    use super::frame;

    #[test]
    fn frames_are_cut_at_their_length_and_partial_ones_wait() {
        let mut b = vec![0x81, 3, b'a', b'b', b'c', 0x89, 0];
        assert_eq!(frame(&b), Some((0x1, &b"abc"[..], 5)));
        assert_eq!(frame(&b[5..]), Some((0x9, &b""[..], 2)));
        b.truncate(4);
        assert_eq!(frame(&b), None);
        let long: Vec<u8> = [vec![0x81, 126, 0x01, 0x00], vec![b'x'; 256]].concat();
        assert_eq!(frame(&long).map(|(_, p, n)| (p.len(), n)), Some((256, 260)));
    }
}
