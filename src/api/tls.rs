//! The protocol over HTTPS, for a plugin dockerd reaches through a `.json` spec with an
//! `https://` address (a `tcp://` or `http://` address is plain text even with a
//! TLSConfig). TLS 1.2 and 1.3 only (rustls offers nothing older). A client must
//! present a certificate the configured client CA signed (mutual TLS), unless the
//! operator explicitly allowed unauthenticated clients.
//!
//! Network peers must not be able to starve the daemon (and so the local dockerd on the
//! unix socket): connections and handshakes in progress are capped, and a connection
//! over a cap is closed before any TLS work. A handshake has 10 s; after it, an idle
//! connection (fresh or kept alive after a response) is closed by hyper's header read
//! timeout, so a silent peer holds its slot for at most ~20 s.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::Backends;
use crate::config::TlsSettings;
use crate::error::{Error, Result};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A flood of refused connections must not flood the log too.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Config(format!("reading certificates from {}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Config(format!("parsing certificates in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Builds the server's TLS configuration from the settings, checking every file.
pub fn server_config(tls: &TlsSettings) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| {
        Error::Config(format!(
            "reading the private key {}: {e}",
            tls.key.display()
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS versions: {e}")))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| Error::Config(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None if tls.insecure_allow_unauthenticated_clients => builder.with_no_client_auth(),
        None => {
            return Err(Error::Config(
                "tls.client_ca is not set: refusing to serve unauthenticated clients; set tls.client_ca to the ca.pem `rbdvol tls init` wrote".into(),
            ))
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| Error::Config(format!("server certificate {}: {e}", tls.cert.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("binding the TLS listener on {addr}"), e))
}

/// The caps on what network peers may hold at once.
#[derive(Clone)]
pub struct Limits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
}

/// Which cap a refused connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Connections,
    Handshakes,
}

impl Limits {
    pub fn new(tls: &TlsSettings) -> Limits {
        Limits {
            connections: Arc::new(Semaphore::new(tls.max_connections)),
            handshakes: Arc::new(Semaphore::new(tls.max_handshakes)),
        }
    }

    /// A connection slot and a handshake slot, or the cap that is full. Never waits:
    /// a peer over the cap is turned away, not queued.
    pub fn admit(&self) -> std::result::Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Cap> {
        let conn = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Cap::Connections)?;
        let handshake = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| Cap::Handshakes)?;
        Ok((conn, handshake))
    }
}

/// Counts refused connections and says so at most once per interval.
struct Refusals {
    count: u64,
    next_log: Option<Instant>,
}

impl Refusals {
    /// Records one refusal; returns how many to report now, if it is time to log.
    fn record(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self.next_log.is_some_and(|t| now < t) {
            return None;
        }
        self.next_log = Some(now + REFUSAL_LOG_INTERVAL);
        Some(std::mem::take(&mut self.count))
    }
}

/// Accepts TLS connections until `shutdown` resolves. A failed handshake (no client
/// certificate, wrong CA, expired, old protocol) closes that connection only; a
/// connection over a cap is closed before its handshake starts.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: Limits,
    driver: Arc<Backends>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(config);
    let mut refusals = Refusals {
        count: 0,
        next_log: None,
    };
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "TLS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (conn_permit, handshake_permit) = match limits.admit() {
            Ok(p) => p,
            Err(cap) => {
                // Dropping the stream closes it: no TLS work for a peer over the cap.
                drop(tcp);
                if let Some(refused) = refusals.record(Instant::now()) {
                    let setting = match cap {
                        Cap::Connections => "tls.max_connections",
                        Cap::Handshakes => "tls.max_handshakes",
                    };
                    tracing::warn!(
                        %peer,
                        refused,
                        cap = setting,
                        "TLS connections closed unserved: over a cap (refused = how many since the last such line; at most one line per 5 s); raise the cap if they are legitimate clients"
                    );
                }
                continue;
            }
        };
        let (acceptor, driver) = (acceptor.clone(), driver.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(handshake_permit);
            match handshake {
                Ok(Ok(stream)) => super::serve_connection(stream, driver).await,
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
            }
            drop(conn_permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: usize, handshakes: usize) -> Limits {
        Limits::new(&TlsSettings {
            max_connections: connections,
            max_handshakes: handshakes,
            ..TlsSettings::default()
        })
    }

    #[test]
    fn handshakes_over_the_cap_are_refused_until_one_finishes() {
        let l = limits(10, 2);
        let a = l.admit().unwrap();
        let (conn_b, handshake_b) = l.admit().unwrap();
        assert_eq!(l.admit().unwrap_err(), Cap::Handshakes);
        // A finished handshake frees its slot; the connection keeps its own.
        drop(handshake_b);
        let c = l.admit().unwrap();
        assert_eq!(l.connections.available_permits(), 7);
        drop((a, conn_b, c));
        // A refusal holds nothing.
        assert_eq!(l.connections.available_permits(), 10);
        assert_eq!(l.handshakes.available_permits(), 2);
    }

    #[test]
    fn connections_over_the_cap_are_refused_until_one_closes() {
        let l = limits(2, 2);
        let (c1, h1) = l.admit().unwrap();
        let (c2, h2) = l.admit().unwrap();
        drop((h1, h2));
        assert_eq!(l.admit().unwrap_err(), Cap::Connections);
        assert_eq!(l.handshakes.available_permits(), 2);
        drop(c1);
        let third = l.admit().unwrap();
        drop((c2, third));
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval_with_a_count() {
        let mut r = Refusals {
            count: 0,
            next_log: None,
        };
        let t0 = Instant::now();
        assert_eq!(r.record(t0), Some(1));
        for i in 1..100 {
            assert_eq!(r.record(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(r.record(t0 + REFUSAL_LOG_INTERVAL), Some(100));
        assert_eq!(r.record(t0 + REFUSAL_LOG_INTERVAL), None);
    }

    #[test]
    fn no_client_ca_is_refused_unless_explicitly_allowed() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::init(dir.path(), &["localhost".into()], "127.0.0.1:1").unwrap();
        let mut tls = TlsSettings {
            listen: "127.0.0.1:0".into(),
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server-key.pem"),
            ..TlsSettings::default()
        };
        let err = server_config(&tls).unwrap_err().to_string();
        assert!(err.contains("tls.client_ca"), "{err}");
        tls.insecure_allow_unauthenticated_clients = true;
        server_config(&tls).unwrap();
    }
}
