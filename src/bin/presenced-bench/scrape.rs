//! Reading a server's `/metrics` (Prometheus text), the one way every bench does it.

use super::Res;

/// The sum of every sample of `/metrics` at `addr` whose line starts with `prefix`: one
/// series (`presence_sessions `, with its space), or all of a family's labelled series
/// (`sink_outbox_events{`).
pub async fn metric(addr: &str, prefix: &str) -> Res<f64> {
    let text = http_get(addr, "/metrics").await?;
    Ok(text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum())
}

async fn http_get(addr: &str, path: &str) -> Res<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
