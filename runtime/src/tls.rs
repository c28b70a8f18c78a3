//! rustls configurations (ring provider, TLS 1.3 only, mutual authentication against the
//! cluster CA, ALPN `tern/1` between nodes and `tern-admin/1` from the command line) and
//! reading a peer's name from its certificate.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::certs::{NodeIdentity, Role};
use crate::error::Error;
use tern_proto::ids::NodeName;
use tern_proto::wire::{ADMIN_ALPN, ALPN};

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &NodeIdentity) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(id.ca()).map_err(tls_err)?;
    Ok(Arc::new(roots))
}

/// How long a silent connection lives, and how often a quiet one is kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A connection that hears nothing for this long is closed, and its peer counted lost.
    pub idle_timeout_ms: u64,
    /// A connection with nothing to say sends a keep-alive this often.
    pub keep_alive_ms: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
        }
    }
}

/// Unidirectional streams a peer may open beyond the largest group migration's snapshots:
/// the data stream and single migrations alongside.
const UNI_STREAMS_SPARE: usize = 64;

fn transport(live: Liveness) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(live.keep_alive_ms.max(1))));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_millis(live.idle_timeout_ms)) {
        t.max_idle_timeout(Some(idle));
    }
    // Every member of a group migration holds a snapshot stream open until the group
    // commits, so the peer must allow that many at once (plus the data stream).
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(
        (tern_proto::migration::GROUP_MEMBERS_MAX + UNI_STREAMS_SPARE) as u32,
    ));
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    Arc::new(t)
}

/// The certificate checks of every handshake a node takes part in: chain to the cluster CA,
/// validity, signatures, and the CA's revocation list once the node holds one (rustls' CRL
/// support, end-entity certificates only). A newer list replaces the checks in place, so
/// the configurations built on them need not change.
pub(crate) struct Verifiers {
    roots: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The CA's subject, which a server names when it asks for a client certificate.
    hints: Vec<rustls::DistinguishedName>,
    current: std::sync::RwLock<CurrentChecks>,
}

struct CurrentChecks {
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    servers: Arc<rustls::client::WebPkiServerVerifier>,
}

impl Verifiers {
    /// Checks against `id`'s CA, with no revocation list yet.
    pub(crate) fn new(id: &NodeIdentity) -> Result<Arc<Verifiers>, Error> {
        let roots = roots(id)?;
        let provider = provider();
        let current = Self::build(&roots, &provider, None)?;
        let hints = roots.subjects();
        Ok(Arc::new(Verifiers {
            roots,
            provider,
            hints,
            current: std::sync::RwLock::new(current),
        }))
    }

    fn build(
        roots: &Arc<RootCertStore>,
        provider: &Arc<rustls::crypto::CryptoProvider>,
        crl: Option<&[u8]>,
    ) -> Result<CurrentChecks, Error> {
        let crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>> =
            crl.map(|der| vec![der.to_vec().into()]).unwrap_or_default();
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .build()
            .map_err(tls_err)?;
        let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()
        .map_err(tls_err)?;
        Ok(CurrentChecks { clients, servers })
    }

    /// From now on, handshakes also check `crl` (DER, already verified as the CA's).
    pub(crate) fn use_crl(&self, crl: &[u8]) -> Result<(), Error> {
        let next = Self::build(&self.roots, &self.provider, Some(crl))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    fn clients(&self) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clients
            .clone()
    }

    fn servers(&self) -> Arc<rustls::client::WebPkiServerVerifier> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .servers
            .clone()
    }
}

/// The handshake-signature checks every verifier here shares: by the crypto provider's
/// algorithms (`self.<path>`), whatever the certificate checks are.
macro_rules! handshake_signatures {
    ($($provider:tt)+) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            let algs = &self.$($provider)+.signature_verification_algorithms;
            rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            let algs = &self.$($provider)+.signature_verification_algorithms;
            rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$($provider)+
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// A node's client-certificate checks, as they stand at each handshake.
#[derive(Debug)]
struct CurrentClients(Arc<Verifiers>);

impl std::fmt::Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifiers")
    }
}

impl rustls::server::danger::ClientCertVerifier for CurrentClients {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.0.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0
            .clients()
            .verify_client_cert(end_entity, intermediates, now)
    }

    handshake_signatures!(0.provider);
}

/// A node's server-certificate checks (when it dials a peer), as they stand at each
/// handshake.
#[derive(Debug)]
struct CurrentServers(Arc<Verifiers>);

impl rustls::client::danger::ServerCertVerifier for CurrentServers {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.0.servers().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    handshake_signatures!(0.provider);
}

/// The QUIC server side of a node: requires a client certificate issued by the cluster CA.
pub fn server_config(id: &NodeIdentity) -> Result<quinn::ServerConfig, Error> {
    server_config_with(id, Liveness::default())
}

/// [`server_config`] with the given liveness.
pub fn server_config_with(id: &NodeIdentity, live: Liveness) -> Result<quinn::ServerConfig, Error> {
    node_server_config(id, live, &Verifiers::new(id)?)
}

/// A node's server side, checking client certificates with `checks`.
pub(crate) fn node_server_config(
    id: &NodeIdentity,
    live: Liveness,
    checks: &Arc<Verifiers>,
) -> Result<quinn::ServerConfig, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(checks.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(CurrentClients(checks.clone())))
        .with_single_cert(vec![id.cert()], id.key())
        .map_err(tls_err)?;
    // Nodes speak `tern/1`; the command line's admin connections `tern-admin/1`.
    tls.alpn_protocols = vec![ALPN.to_vec(), ADMIN_ALPN.to_vec()];
    // No resumption: a resumed session skips the certificate checks, so a certificate
    // revoked since would get back in.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(live));
    Ok(cfg)
}

/// The QUIC client side of a node: presents its certificate and trusts only the cluster CA.
pub fn client_config(id: &NodeIdentity) -> Result<quinn::ClientConfig, Error> {
    client_config_with(id, Liveness::default())
}

/// [`client_config`] with the given liveness.
pub fn client_config_with(id: &NodeIdentity, live: Liveness) -> Result<quinn::ClientConfig, Error> {
    node_client_config(id, live, &Verifiers::new(id)?)
}

/// A node's client side (dialing peers), checking server certificates with `checks`.
pub(crate) fn node_client_config(
    id: &NodeIdentity,
    live: Liveness,
    checks: &Arc<Verifiers>,
) -> Result<quinn::ClientConfig, Error> {
    let mut tls = rustls::ClientConfig::builder_with_provider(checks.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CurrentServers(checks.clone())))
        .with_client_auth_cert(vec![id.cert()], id.key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every handshake checks the peer's certificate against the current
    // revocation list.
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(live));
    Ok(cfg)
}

/// The node name in a certificate: its first DNS subject alternative name.
pub fn name_from_cert(der: &[u8]) -> Result<NodeName, Error> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Cert(format!("unreadable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Cert(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| Error::Cert("certificate has no subject alternative name".into()))?;
    for name in &san.value.general_names {
        if let GeneralName::DNSName(dns) = name {
            crate::certs::check_node_name(dns)?;
            return Ok(NodeName::new(dns));
        }
    }
    Err(Error::Cert(
        "certificate names no node (no DNS name)".into(),
    ))
}

/// The name of the node at the other end of an authenticated connection.
pub fn peer_name(conn: &quinn::Connection) -> Result<NodeName, Error> {
    peer_name_and_role(conn).map(|(name, _)| name)
}

/// The certificate (DER) at the other end of an authenticated connection.
pub(crate) fn peer_cert(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// The name and role in the certificate at the other end of an authenticated connection.
pub fn peer_name_and_role(conn: &quinn::Connection) -> Result<(NodeName, Role), Error> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| Error::Cert("peer presented no certificate".into()))?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| Error::Cert("peer identity is not a certificate chain".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Error::Cert("peer certificate chain is empty".into()))?;
    Ok((name_from_cert(leaf)?, crate::certs::role_from_cert(leaf)?))
}

/// Accepts a node's certificate issued by the cluster CA (checking the chain, validity and
/// signatures as for the name it carries), naming `expect` when the client knows which node
/// it meant, any node otherwise (the command line dialing an address learns which node
/// answered from the certificate). An admin's or observer's certificate is not a node's.
#[derive(Debug)]
struct NodeOfTheCluster {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    expect: Option<NodeName>,
}

impl rustls::client::danger::ServerCertVerifier for NodeOfTheCluster {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = name_from_cert(end_entity)
            .map_err(|e| rustls::Error::General(format!("node certificate: {e}")))?;
        if let Some(expect) = &self.expect {
            if *expect != name {
                return Err(rustls::Error::General(format!(
                    "expected node {expect}, but the certificate names {name}"
                )));
            }
        }
        match crate::certs::role_from_cert(end_entity) {
            Ok(Role::Node) => {}
            Ok(role) => {
                return Err(rustls::Error::General(format!(
                    "{name} answered with an {role} certificate, not a node's"
                )))
            }
            Err(e) => return Err(rustls::Error::General(format!("node certificate: {e}"))),
        }
        let as_server = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| rustls::Error::General(format!("node name {name}: {e}")))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &as_server, ocsp_response, now)
    }

    handshake_signatures!(provider);
}

/// The QUIC client side of an admin connection (ALPN `tern-admin/1`): presents `id`'s
/// certificate and accepts a node certificate the cluster CA issued, naming `expect` when
/// given.
pub fn admin_client_config(
    id: &NodeIdentity,
    expect: Option<&NodeName>,
) -> Result<quinn::ClientConfig, Error> {
    let provider = provider();
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(id)?, provider.clone())
            .build()
            .map_err(tls_err)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeOfTheCluster {
            inner,
            provider: provider.clone(),
            expect: expect.cloned(),
        }))
        .with_client_auth_cert(vec![id.cert()], id.key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![ADMIN_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(Liveness::default()));
    Ok(cfg)
}

/// The ALPN protocol `conn` negotiated, if any.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}
