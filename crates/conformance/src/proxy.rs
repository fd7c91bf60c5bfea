//! A loopback TCP proxy for fault tests: it forwards every byte between a
//! client and a server, counts what passes, and on request loses the
//! server's reply to one request (the request reaches the server and is
//! applied; the client never hears back), or answers it with bytes of its
//! own (an HTTP 500, say) instead.
//!
//! It knows no protocol: the reply it loses is the first data the server
//! sends after the matching request was seen. Use it with one request in
//! flight per connection at the moment the fault fires (a pipelined
//! request ahead of it would lose its reply instead), and on connections
//! the server does not push unsolicited data on (pub/sub, `NOTIFY`).
//!
//! ```no_run
//! # async fn demo() {
//! use runstate_conformance::proxy::{Proxy, ReplyFault};
//! let proxy = Proxy::start("127.0.0.1:6379".parse().unwrap()).await;
//! // Connect the store under test to proxy.addr() instead of the server.
//! proxy.arm(ReplyFault::drop_next());
//! // The next request is forwarded; its reply is lost and the
//! // connection closed.
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

type Matcher = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// What to do with the reply to one request.
pub struct ReplyFault {
    /// Which request: its first bytes are tested (`None`: the next one).
    matcher: Option<Matcher>,
    /// Sent instead of the server's reply; `None` closes the connection.
    replace_with: Option<Vec<u8>>,
}

impl ReplyFault {
    /// Lose the reply to the next request and close its connection.
    pub fn drop_next() -> Self {
        ReplyFault {
            matcher: None,
            replace_with: None,
        }
    }

    /// Lose the reply to the next request whose first bytes satisfy
    /// `matcher`, and close its connection.
    pub fn drop_when(matcher: impl Fn(&[u8]) -> bool + Send + Sync + 'static) -> Self {
        ReplyFault {
            matcher: Some(Box::new(matcher)),
            replace_with: None,
        }
    }

    /// Instead of losing the reply, send `bytes` in its place (and close).
    pub fn replace_with(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.replace_with = Some(bytes.into());
        self
    }
}

#[derive(Default)]
struct Shared {
    fault: Mutex<Option<ReplyFault>>,
    fired: Notify,
    fired_count: AtomicU64,
    bytes_to_client: AtomicU64,
    bytes_to_server: AtomicU64,
    turns: AtomicU64,
    connections: AtomicU64,
}

/// A running proxy; it stops accepting when dropped (connections already
/// open run until either side closes).
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                accepting.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(pump(client, server, Arc::clone(&accepting)));
            }
        });
        Proxy {
            addr,
            shared,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms a fault for the next matching request (replacing one armed
    /// before).
    pub fn arm(&self, fault: ReplyFault) {
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(fault);
    }

    /// Whether an armed fault is still waiting for its request.
    pub fn armed(&self) -> bool {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// How many faults fired so far.
    pub fn fired(&self) -> u64 {
        self.shared.fired_count.load(Ordering::SeqCst)
    }

    /// Waits until the next fault fires (the matching request was
    /// forwarded and its reply lost or replaced).
    pub async fn wait_fired(&self) {
        let before = self.fired();
        loop {
            let notified = self.shared.fired.notified();
            if self.fired() > before {
                return;
            }
            notified.await;
        }
    }

    /// Bytes forwarded from the server to clients so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.bytes_to_client.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from clients to the server so far.
    pub fn bytes_to_server(&self) -> u64 {
        self.shared.bytes_to_server.load(Ordering::SeqCst)
    }

    /// Round trips so far: how many times a client sent after the server
    /// had answered (or first), summed over connections. A request and its
    /// reply count one, however many TCP segments carry them.
    pub fn turns(&self) -> u64 {
        self.shared.turns.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Which side spoke last on one connection, for counting turns and for
/// knowing whose request a reply answers.
#[derive(Default)]
struct Conversation {
    client_spoke_last: bool,
    /// The first bytes of the request being answered.
    request: Vec<u8>,
    /// This request's reply is to be lost (or replaced).
    doomed: Option<Option<Vec<u8>>>,
}

const REQUEST_HEAD: usize = 512;

async fn pump(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let talk = Arc::new(Mutex::new(Conversation::default()));
    let upstream = {
        let (talk, shared) = (Arc::clone(&talk), Arc::clone(&shared));
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                {
                    let mut talk = talk.lock().unwrap_or_else(PoisonError::into_inner);
                    if !talk.client_spoke_last {
                        talk.client_spoke_last = true;
                        talk.request.clear();
                        shared.turns.fetch_add(1, Ordering::SeqCst);
                    }
                    let room = REQUEST_HEAD.saturating_sub(talk.request.len());
                    talk.request.extend_from_slice(&buf[..n.min(room)]);
                    if talk.doomed.is_none() {
                        let mut fault = shared.fault.lock().unwrap_or_else(PoisonError::into_inner);
                        let hit = fault
                            .as_ref()
                            .is_some_and(|f| f.matcher.as_ref().is_none_or(|m| m(&talk.request)));
                        if hit && let Some(fault) = fault.take() {
                            talk.doomed = Some(fault.replace_with);
                        }
                    }
                }
                shared.bytes_to_server.fetch_add(n as u64, Ordering::SeqCst);
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let downstream = {
        let shared = Arc::clone(&shared);
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let doomed = {
                    let mut talk = talk.lock().unwrap_or_else(PoisonError::into_inner);
                    talk.client_spoke_last = false;
                    talk.doomed.take()
                };
                if let Some(replacement) = doomed {
                    if let Some(bytes) = replacement {
                        let _ = client_write.write_all(&bytes).await;
                    }
                    shared.fired_count.fetch_add(1, Ordering::SeqCst);
                    shared.fired.notify_waiters();
                    break;
                }
                shared.bytes_to_client.fetch_add(n as u64, Ordering::SeqCst);
                if client_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = client_write.shutdown().await;
        }
    };
    // Either side ending ends the connection: dropping the halves closes
    // both sockets.
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_counts_and_loses_one_reply() {
        let proxy = Proxy::start(echo_server().await).await;
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        let mut buf = [0u8; 16];
        client.write_all(b"ping").await.expect("write");
        client.read_exact(&mut buf[..4]).await.expect("echo");
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(proxy.turns(), 1);

        proxy.arm(ReplyFault::drop_when(|req| req.starts_with(b"PUT")));
        client.write_all(b"GET!").await.expect("write");
        client.read_exact(&mut buf[..4]).await.expect("not matched");
        client.write_all(b"PUT!").await.expect("write");
        assert_eq!(
            client.read(&mut buf).await.expect("closed"),
            0,
            "reply lost"
        );
        assert_eq!(proxy.fired(), 1);
        assert_eq!(proxy.turns(), 3);

        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        proxy.arm(ReplyFault::drop_next().replace_with(b"500!".to_vec()));
        client.write_all(b"post").await.expect("write");
        client.read_exact(&mut buf[..4]).await.expect("replaced");
        assert_eq!(&buf[..4], b"500!");
    }
}
