//! Where a node is and how to reach it: address parsing (`host:port`, `http://`, `https://`,
//! `unix:/path`, a bare socket path) and the connection builder (TLS with a CA, mutual TLS with a
//! client certificate, Unix sockets, connect timeout and per-call deadlines).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Client;
use crate::error::{Error, Result, error_chain};

/// A parsed node address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `http://host:port` (plaintext) or `https://host:port` (TLS).
    Tcp { uri: String, tls: bool },
    /// A Unix domain socket.
    Unix(PathBuf),
}

impl Target {
    /// Parse an address. `host:port` becomes `http://host:port` (or `https://` when `tls` is
    /// wanted); `unix:/path` and anything containing `/` without a scheme is a Unix socket.
    pub fn parse(addr: &str, tls: bool) -> Result<Target> {
        let a = addr.trim();
        if a.is_empty() {
            return Err(Error::Config("the node address is empty".into()));
        }
        if let Some(p) = a.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(Error::Config(
                    "`unix:` needs a socket path, e.g. unix:/run/fold/owner.sock".into(),
                ));
            }
            return Ok(Target::Unix(PathBuf::from(p)));
        }
        if let Some(rest) = a.strip_prefix("http://") {
            if tls {
                return Err(Error::Config(format!(
                    "TLS options were given but `{a}` is plaintext http://; use https://{rest}"
                )));
            }
            return Ok(Target::Tcp {
                uri: a.to_string(),
                tls: false,
            });
        }
        if a.starts_with("https://") {
            return Ok(Target::Tcp {
                uri: a.to_string(),
                tls: true,
            });
        }
        if a.contains("://") {
            return Err(Error::Config(format!(
                "unsupported scheme in `{a}`: use host:port, http://, https:// or unix:/path"
            )));
        }
        if a.contains('/') || a.ends_with(".sock") {
            return Ok(Target::Unix(PathBuf::from(a)));
        }
        if !a.contains(':') {
            return Err(Error::Config(format!(
                "`{a}` has no port: use host:port, e.g. 127.0.0.1:50051"
            )));
        }
        let scheme = if tls { "https" } else { "http" };
        Ok(Target::Tcp {
            uri: format!("{scheme}://{a}"),
            tls,
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { uri, .. } => f.write_str(uri),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Builds a [`Client`].
///
/// ```no_run
/// # async fn demo() -> fold_client::Result<()> {
/// use std::time::Duration;
/// // Plaintext TCP with a 5 s deadline on every call:
/// let client = fold_client::ClientBuilder::new("127.0.0.1:50051")
///     .timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// // Mutual TLS:
/// let secure = fold_client::ClientBuilder::new("https://node.example:50051")
///     .tls_ca_file("ca.pem")
///     .tls_identity_files("client.pem", "client.key")
///     .connect()
///     .await?;
/// // The node's Unix socket:
/// let local = fold_client::ClientBuilder::new("unix:/run/fold/owner.sock").connect().await?;
/// # let _ = (client, secure, local); Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    addr: String,
    ca: Option<Pem>,
    identity: Option<(Pem, Pem)>,
    server_name: Option<String>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
}

#[derive(Clone, Debug)]
enum Pem {
    File(PathBuf),
    Text(Vec<u8>),
}

impl Pem {
    fn read(&self, what: &str) -> Result<Vec<u8>> {
        match self {
            Pem::Text(t) => Ok(t.clone()),
            Pem::File(p) => std::fs::read(p)
                .map_err(|e| Error::Config(format!("cannot read {what} {}: {e}", p.display()))),
        }
    }
}

impl ClientBuilder {
    /// Start from an address: `host:port`, `http://…`, `https://…`, `unix:/path` or a socket path.
    pub fn new(addr: impl Into<String>) -> Self {
        ClientBuilder {
            addr: addr.into(),
            ca: None,
            identity: None,
            server_name: None,
            timeout: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Trust this CA (PEM file) for the node's certificate; turns TLS on.
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(Pem::File(path.into()));
        self
    }

    /// Trust this CA (PEM text); turns TLS on.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(Pem::Text(pem.into()));
        self
    }

    /// Present this client certificate and key (PEM files): mutual TLS.
    pub fn tls_identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// Present this client certificate and key (PEM text): mutual TLS.
    pub fn tls_identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((Pem::Text(cert.into()), Pem::Text(key.into())));
        self
    }

    /// The name to verify the node's certificate against (default: the address's host).
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Deadline of every call (sent as `grpc-timeout`; the node stops work past it).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// How long to wait for the connection (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    fn wants_tls(&self) -> bool {
        self.ca.is_some() || self.identity.is_some() || self.server_name.is_some()
    }

    /// The parsed target.
    pub fn target(&self) -> Result<Target> {
        Target::parse(&self.addr, self.wants_tls())
    }

    /// Connect now: TCP and TLS connections (including the TLS handshake) are made before this
    /// returns, so a refused connection or a certificate problem is reported here as
    /// [`Error::Connect`]. Unix socket channels connect on first use.
    pub async fn connect(self) -> Result<Client> {
        let target = self.target()?;
        let channel = match &target {
            Target::Unix(path) => {
                if self.wants_tls() {
                    return Err(Error::Config(
                        "TLS options do not apply to a Unix socket (the socket's file mode guards it)"
                            .into(),
                    ));
                }
                if !path.exists() {
                    return Err(Error::Connect {
                        addr: target.to_string(),
                        detail: "no such socket file".into(),
                    });
                }
                local_link::channel(
                    &local_link::LinkAddr::Unix(path.clone()),
                    self.connect_timeout,
                )
            }
            Target::Tcp { uri, tls } => self.tcp_channel(uri, *tls, &target).await?,
        };
        Ok(Client::from_channel(channel, self.timeout, target))
    }

    async fn tcp_channel(&self, uri: &str, tls: bool, target: &Target) -> Result<Channel> {
        let mut ep = Endpoint::from_shared(uri.to_string())
            .map_err(|e| Error::Config(format!("bad address `{uri}`: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if tls {
            // tonic's TLS runs on rustls; pick its crypto provider once (several may be enabled).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let Some(ca) = &self.ca else {
                return Err(Error::Config(format!(
                    "`{uri}` is TLS: give the CA that signed the node's certificate (--tls-ca / FOLDCTL_TLS_CA)"
                )));
            };
            let mut cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.read("CA certificate")?));
            if let Some((cert, key)) = &self.identity {
                cfg = cfg.identity(Identity::from_pem(
                    cert.read("client certificate")?,
                    key.read("client key")?,
                ));
            }
            if let Some(name) = &self.server_name {
                cfg = cfg.domain_name(name.clone());
            }
            ep = ep
                .tls_config(cfg)
                .map_err(|e| Error::Config(format!("TLS configuration: {}", error_chain(&e))))?;
        }
        ep.connect().await.map_err(|e| Error::Connect {
            addr: target.to_string(),
            detail: error_chain(&e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let tcp = |u: &str, tls| Target::Tcp { uri: u.into(), tls };
        assert_eq!(
            Target::parse("127.0.0.1:50051", false).unwrap(),
            tcp("http://127.0.0.1:50051", false)
        );
        assert_eq!(
            Target::parse("localhost:1", true).unwrap(),
            tcp("https://localhost:1", true)
        );
        assert_eq!(
            Target::parse("http://h:1", false).unwrap(),
            tcp("http://h:1", false)
        );
        assert_eq!(
            Target::parse("https://h:1", false).unwrap(),
            tcp("https://h:1", true)
        );
        assert_eq!(
            Target::parse("unix:/a/b.sock", false).unwrap(),
            Target::Unix("/a/b.sock".into())
        );
        assert_eq!(
            Target::parse("data/owner.sock", false).unwrap(),
            Target::Unix("data/owner.sock".into())
        );
        assert!(Target::parse("http://h:1", true).is_err());
        assert!(Target::parse("ftp://h:1", false).is_err());
        assert!(Target::parse("nohost", false).is_err());
        assert!(Target::parse("unix:", false).is_err());
    }
}
