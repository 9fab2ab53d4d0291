//! A TCP proxy on loopback that a test can cut (every connection dropped, new ones
//! refused) and heal: a network partition between two real servers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Delay (ms) added to bytes going from the client to the target.
    delay_ms: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Forwards `127.0.0.1:<port>` (a free port, bound now) to `127.0.0.1:<target>`.
    pub async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, k, d) = (cut.clone(), conns.clone(), delay_ms.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the partition refuses new links
                }
                let d = d.clone();
                let h = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        forward(inbound, outbound, d).await;
                    }
                });
                k.lock().push(h);
            }
        });
        Proxy { port, cut, delay_ms, conns, accept }
    }

    /// From now on, bytes from the client reach the target `d` later (in order): a slow
    /// link in one direction.
    pub fn delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The partition: drops every link and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies both ways; client-to-target bytes wait the current delay, keeping their order.
async fn forward(inbound: TcpStream, outbound: TcpStream, delay_ms: Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ci, mut co) = inbound.into_split();
    let (mut ti, mut to) = outbound.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let up_read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = ci.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let due = tokio::time::Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let up_write = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let _ = tokio::io::copy(&mut ti, &mut co).await;
    };
    tokio::select! {
        _ = async { tokio::join!(up_read, up_write) } => {}
        _ = down => {}
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for h in self.conns.lock().drain(..) {
            h.abort();
        }
    }
}
