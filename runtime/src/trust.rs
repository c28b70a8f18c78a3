//! What a node trusts at each handshake: the cluster CA, the CA's revocation list, and the
//! node's own certificate, which it can replace without restarting.
//!
//! A revocation list is a DER X.509 CRL signed by the cluster CA
//! ([`ClusterCa::revocation_list`](crate::certs::ClusterCa::revocation_list), `tern ca
//! revoke`). It is self-authenticating: any node or admin may hand it on, and a node installs
//! it only when the CA's signature verifies and its number is higher than the one it holds.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::certs::{NodeIdentity, Role};
use crate::error::Error;
use crate::tls::{Liveness, Verifiers};

/// Largest revocation list a node takes, in bytes (a list naming one certificate is about
/// 300 bytes, each more about 40).
pub const CRL_BYTES_MAX: usize = 256 << 10;

/// A revocation list whose signature by the cluster CA has been checked.
#[derive(Debug, Clone)]
pub struct Revocations {
    number: u64,
    der: Vec<u8>,
    serials: HashSet<Vec<u8>>,
}

fn crl_err(what: impl std::fmt::Display) -> Error {
    Error::Cert(format!("revocation list: {what}"))
}

impl Revocations {
    /// Checks that `crl` is a revocation list the CA in `ca_der` issued and signed, with a
    /// number, at most [`CRL_BYTES_MAX`] bytes, and reads which serial numbers it revokes.
    ///
    /// ```
    /// # fn demo() -> Result<(), tern::Error> {
    /// use tern::certs::ClusterCa;
    /// use tern::trust::Revocations;
    /// let (ca, other) = (ClusterCa::new()?, ClusterCa::new()?);
    /// let crl = ca.revocation_list(&[], 7)?;
    /// assert_eq!(Revocations::verify(&crl, ca.cert_der())?.number(), 7);
    /// assert!(Revocations::verify(&crl, other.cert_der()).is_err());
    /// # Ok(()) }
    /// ```
    pub fn verify(crl: &[u8], ca_der: &[u8]) -> Result<Revocations, Error> {
        if crl.len() > CRL_BYTES_MAX {
            return Err(crl_err(format!(
                "{} bytes, over the {CRL_BYTES_MAX}-byte bound",
                crl.len()
            )));
        }
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| Error::Cert(format!("unreadable CA certificate: {e}")))?;
        let (rest, list) =
            x509_parser::parse_x509_crl(crl).map_err(|e| crl_err(format!("unreadable: {e}")))?;
        if !rest.is_empty() {
            return Err(crl_err(format!("{} bytes after its end", rest.len())));
        }
        if list.issuer().as_raw() != ca.subject().as_raw() {
            return Err(crl_err("not issued by the cluster CA"));
        }
        list.verify_signature(ca.public_key())
            .map_err(|e| crl_err(format!("its signature is not the cluster CA's: {e}")))?;
        let digits = list
            .crl_number()
            .ok_or_else(|| crl_err("it has no number"))?
            .to_u64_digits();
        let number = match digits.as_slice() {
            [] => 0,
            [n] => *n,
            _ => return Err(crl_err("its number is over 2^64")),
        };
        let serials = list
            .iter_revoked_certificates()
            .map(|r| crate::certs::trim_serial(r.raw_serial()))
            .collect();
        Ok(Revocations {
            number,
            der: crl.to_vec(),
            serials,
        })
    }

    /// The list's number: a node keeps the highest it has seen.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The list, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Whether the certificate with this serial number ([`NodeIdentity::serial`]) is revoked.
    pub fn revokes(&self, serial: &[u8]) -> bool {
        self.serials.contains(serial)
    }

    /// Whether the certificate `der` is revoked (false if it cannot be read).
    pub fn revokes_cert(&self, der: &[u8]) -> bool {
        crate::certs::serial_of(der).is_ok_and(|s| self.revokes(&s))
    }

    /// The serial numbers it revokes.
    pub fn serials(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.serials.iter()
    }

    /// How many certificates it revokes.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// Whether it revokes none.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// What became of a revocation list offered to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// It is newer than the one the node held, and now checked at every handshake.
    Newer,
    /// The node already holds this number or a higher one; nothing changed.
    NotNewer,
}

/// A node's identity and checks: its certificate (replaceable), the CA's revocation list, and
/// the TLS configurations built from them.
pub(crate) struct Trust {
    checks: Arc<Verifiers>,
    live: Liveness,
    state: Mutex<TrustState>,
}

struct TrustState {
    identity: NodeIdentity,
    client: quinn::ClientConfig,
    revocations: Option<Arc<Revocations>>,
}

impl Trust {
    pub(crate) fn new(identity: NodeIdentity, live: Liveness) -> Result<Trust, Error> {
        let checks = Verifiers::new(&identity)?;
        let client = crate::tls::node_client_config(&identity, live, &checks)?;
        Ok(Trust {
            checks,
            live,
            state: Mutex::new(TrustState {
                identity,
                client,
                revocations: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TrustState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server side, for the endpoint (at start and after a reload).
    pub(crate) fn server_config(&self) -> Result<quinn::ServerConfig, Error> {
        crate::tls::node_server_config(&self.state().identity, self.live, &self.checks)
    }

    /// The client side for dialing a peer, with the current certificate.
    pub(crate) fn client_config(&self) -> quinn::ClientConfig {
        self.state().client.clone()
    }

    /// The certificate the node presents now.
    pub(crate) fn identity(&self) -> NodeIdentity {
        self.state().identity.clone()
    }

    /// Replaces the node's certificate for the connections made from now on, and returns the
    /// server side to give the endpoint. The new certificate must be a node's, for the same
    /// name, from the same CA.
    pub(crate) fn reload(&self, identity: NodeIdentity) -> Result<quinn::ServerConfig, Error> {
        let mut st = self.state();
        let (old, new) = (st.identity.name()?, identity.name()?);
        if old != new {
            return Err(Error::Cert(format!(
                "the new certificate names {new}, not this node ({old})"
            )));
        }
        let role = identity.role()?;
        if role != Role::Node {
            return Err(Error::Cert(format!(
                "the new certificate is an {role}'s, not a node's"
            )));
        }
        if identity.ca_der != st.identity.ca_der {
            return Err(Error::Cert(
                "the new certificate comes with another CA; a node keeps its cluster".into(),
            ));
        }
        if st
            .revocations
            .as_ref()
            .is_some_and(|r| r.revokes_cert(&identity.cert_der))
        {
            return Err(Error::Cert("the new certificate is revoked".into()));
        }
        let server = crate::tls::node_server_config(&identity, self.live, &self.checks)?;
        st.client = crate::tls::node_client_config(&identity, self.live, &self.checks)?;
        st.identity = identity;
        Ok(server)
    }

    /// The revocation list the node holds, if any.
    pub(crate) fn revocations(&self) -> Option<Arc<Revocations>> {
        self.state().revocations.clone()
    }

    /// Verifies `crl` against the cluster CA and installs it when it is newer than the list
    /// held: every handshake from now on checks it.
    pub(crate) fn install(&self, crl: &[u8]) -> Result<(Installed, Arc<Revocations>), Error> {
        let mut st = self.state();
        // Every peer hands over the list it holds at link-up: the one held already costs no
        // parse and no signature check, however often a peer sends it.
        if let Some(held) = st.revocations.as_ref().filter(|h| h.der() == crl) {
            return Ok((Installed::NotNewer, held.clone()));
        }
        let list = Arc::new(Revocations::verify(crl, &st.identity.ca_der)?);
        if let Some(held) = &st.revocations {
            if held.number() >= list.number() {
                return Ok((Installed::NotNewer, held.clone()));
            }
        }
        self.checks.use_crl(crl)?;
        st.revocations = Some(list.clone());
        Ok((Installed::Newer, list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::ClusterCa;

    #[test]
    fn a_list_is_believed_for_its_signature_number_and_size_only() {
        let ca = ClusterCa::new().expect("a CA");
        let other = ClusterCa::new().expect("another CA");
        let phone = ca.issue("phone").expect("a certificate");
        let serial = phone.serial().expect("a serial");
        let crl = ca
            .revocation_list(std::slice::from_ref(&serial), 3)
            .expect("a list");
        let list = Revocations::verify(&crl, ca.cert_der()).expect("the CA's list");
        assert_eq!((list.number(), list.len()), (3, 1));
        assert!(list.revokes(&serial) && list.revokes_cert(&phone.cert_der));
        assert!(!list.revokes_cert(&ca.issue("tv").expect("a certificate").cert_der));
        // Another CA's list; junk; a list over the bound; a list with bytes after it.
        let forged = other.revocation_list(&[serial], 4).expect("a list");
        let err = |bytes: &[u8]| {
            Revocations::verify(bytes, ca.cert_der())
                .expect_err("believed")
                .to_string()
        };
        assert!(err(&forged).contains("not the cluster CA's"));
        assert!(err(b"junk").contains("unreadable"));
        assert!(err(&vec![0u8; CRL_BYTES_MAX + 1]).contains("bound"));
        let mut trailing = crl.clone();
        trailing.push(0);
        assert!(err(&trailing).contains("after its end"));
    }

    #[test]
    fn a_node_keeps_the_newest_list() {
        let ca = ClusterCa::new().expect("a CA");
        let trust =
            Trust::new(ca.issue("a").expect("a certificate"), Liveness::default()).expect("checks");
        let list = |n| ca.revocation_list(&[], n).expect("a list");
        assert_eq!(
            trust.install(&list(2)).expect("installed").0,
            Installed::Newer
        );
        assert_eq!(
            trust.install(&list(2)).expect("same").0,
            Installed::NotNewer
        );
        assert_eq!(
            trust.install(&list(1)).expect("older").0,
            Installed::NotNewer
        );
        assert_eq!(trust.install(&list(5)).expect("newer").0, Installed::Newer);
        assert_eq!(trust.revocations().map(|r| r.number()), Some(5));
    }
}
