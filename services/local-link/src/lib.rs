//! The local link between a fold-node and its p2p-sidecar: where one side listens and how the
//! other connects. A link address is either a Unix domain socket path (`unix:/path` or any
//! string containing `/`) or a loopback TCP address (`127.0.0.1:port`, optionally `tcp://`).
//!
//! Unix sockets are created with mode 0600 so other local users cannot use the link. TCP
//! streams, accepted or dialed, get `TCP_NODELAY` (without it every unary call waits ~44 ms on
//! Nagle + delayed ACK).

pub mod mux;
pub mod token;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where a local gRPC service listens or is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for LinkAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            LinkAddr::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl FromStr for LinkAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("`unix:` needs a socket path, e.g. unix:/run/fold/sidecar.sock".into());
            }
            return Ok(LinkAddr::Unix(PathBuf::from(p)));
        }
        let tcp = s.strip_prefix("tcp://").unwrap_or(s);
        if let Ok(addr) = tcp.parse::<SocketAddr>() {
            return Ok(LinkAddr::Tcp(addr));
        }
        if s.contains('/') || s.ends_with(".sock") {
            return Ok(LinkAddr::Unix(PathBuf::from(s)));
        }
        Err(format!(
            "`{s}` is neither a socket path (unix:/path/to.sock) nor a TCP address (127.0.0.1:50061)"
        ))
    }
}

impl LinkAddr {
    /// True for TCP links, which any local user can reach (so they need a token).
    pub fn is_tcp(&self) -> bool {
        matches!(self, LinkAddr::Tcp(_))
    }

    /// Resolve a relative Unix socket path against `base` (the data directory).
    pub fn relative_to(self, base: &Path) -> LinkAddr {
        match self {
            LinkAddr::Unix(p) if p.is_relative() => LinkAddr::Unix(base.join(p)),
            other => other,
        }
    }
}

/// A connection accepted on a link listener.
pub enum LinkStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// What a server learns about a link connection.
#[derive(Clone, Debug)]
pub struct LinkConnectInfo {
    /// The remote TCP address (None for Unix sockets).
    pub remote_addr: Option<SocketAddr>,
}

impl Connected for LinkStream {
    type ConnectInfo = LinkConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        LinkConnectInfo {
            remote_addr: match self {
                LinkStream::Unix(_) => None,
                LinkStream::Tcp(t) => t.peer_addr().ok(),
            },
        }
    }
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            LinkStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            LinkStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Unix(s) => Pin::new(s).poll_flush(cx),
            LinkStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            LinkStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            LinkStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            LinkStream::Unix(s) => s.is_write_vectored(),
            LinkStream::Tcp(s) => s.is_write_vectored(),
        }
    }
}

/// A bound link listener; turn it into a connection stream for
/// `tonic::transport::Server::serve_with_incoming_shutdown` with [`LinkListener::into_incoming`].
pub enum LinkListener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
}

impl LinkListener {
    /// Bind. A stale Unix socket file left by a dead process is replaced; the socket gets mode
    /// 0600 and its parent directory is created if missing.
    pub async fn bind(addr: &LinkAddr) -> io::Result<LinkListener> {
        match addr {
            LinkAddr::Unix(path) => {
                if let Some(parent) = path.parent()
                    && !parent.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(parent)?;
                }
                if path.exists() {
                    // A live server answers a connect; only a dead socket file is removed.
                    if UnixStream::connect(path).await.is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running process", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(LinkListener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
            LinkAddr::Tcp(a) => Ok(LinkListener::Tcp(TcpListener::bind(a).await?)),
        }
    }

    /// The address actually bound (resolves port 0).
    pub fn local_addr(&self) -> io::Result<LinkAddr> {
        match self {
            LinkListener::Unix { path, .. } => Ok(LinkAddr::Unix(path.clone())),
            LinkListener::Tcp(l) => Ok(LinkAddr::Tcp(l.local_addr()?)),
        }
    }

    /// A stream of accepted connections. Accept errors are logged and skipped (a transient
    /// EMFILE must not end the server).
    pub fn into_incoming(self) -> impl Stream<Item = io::Result<LinkStream>> + Send + 'static {
        futures::stream::unfold(self, |l| async move {
            loop {
                let res = match &l {
                    LinkListener::Unix { listener, .. } => {
                        listener.accept().await.map(|(s, _)| LinkStream::Unix(s))
                    }
                    LinkListener::Tcp(listener) => listener.accept().await.and_then(|(s, _)| {
                        s.set_nodelay(true)?;
                        Ok(LinkStream::Tcp(s))
                    }),
                };
                match res {
                    Ok(s) => return Some((Ok(s), l)),
                    Err(e) => {
                        tracing::warn!(error = %e, "local link accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        if let LinkListener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A lazily connecting gRPC channel to a link address. The channel (re)connects on demand, so a
/// peer process that starts later or restarts is picked up without rebuilding the channel.
pub fn channel(addr: &LinkAddr, connect_timeout: Duration) -> Channel {
    let target = addr.clone();
    // The URI is only used for the :authority header; the connector below decides where to go.
    let endpoint = Endpoint::from_static("http://local-link")
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let target = target.clone();
        async move {
            let stream = match target {
                LinkAddr::Unix(p) => LinkStream::Unix(UnixStream::connect(p).await?),
                LinkAddr::Tcp(a) => {
                    let s = TcpStream::connect(a).await?;
                    s.set_nodelay(true)?;
                    LinkStream::Tcp(s)
                }
            };
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/tmp/a.sock".parse::<LinkAddr>(),
            Ok(LinkAddr::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            "run/a.sock".parse::<LinkAddr>(),
            Ok(LinkAddr::Unix("run/a.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:5000".parse::<LinkAddr>(),
            Ok(LinkAddr::Tcp("127.0.0.1:5000".parse().unwrap()))
        );
        assert_eq!(
            "tcp://127.0.0.1:5000".parse::<LinkAddr>(),
            Ok(LinkAddr::Tcp("127.0.0.1:5000".parse().unwrap()))
        );
        assert!("nonsense".parse::<LinkAddr>().is_err());
        assert!("unix:".parse::<LinkAddr>().is_err());
    }

    #[tokio::test]
    async fn unix_socket_is_private_and_stale_file_is_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        std::fs::write(&path, b"stale").unwrap();
        let l = LinkListener::bind(&LinkAddr::Unix(path.clone()))
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second bind while the first is live refuses.
        let err = LinkListener::bind(&LinkAddr::Unix(path.clone()))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        assert!(!path.exists());
    }
}
