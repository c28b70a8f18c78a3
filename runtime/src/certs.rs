//! A cluster CA and node certificates (rcgen), in memory and on disk.
//!
//! ```
//! let ca = tern::certs::ClusterCa::new().unwrap();
//! let phone = ca.issue("phone").unwrap();
//! assert_eq!(phone.name().unwrap().as_str(), "phone");
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::Error;
use tern_proto::ids::NodeName;

const CA_COMMON_NAME: &str = "Tern cluster CA";

fn cert_err(e: impl std::fmt::Display) -> Error {
    Error::Cert(e.to_string())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Checks that `name` can be a node name: 1 to 63 of `a-z`, `0-9` and `-`, not starting or
/// ending with `-` (it is the certificate's DNS name).
pub fn check_node_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "node name {name:?} must be 1-63 characters of a-z, 0-9 and '-'"
        )))
    }
}

/// What a certificate lets its holder do, read from the certificate by every node it meets.
///
/// A certificate names its role in a URI subject alternative name, `urn:tern:role:ROLE`,
/// which the cluster CA signs with the rest. A certificate without one (issued before roles
/// existed) is a node's.
///
/// ```
/// use tern::certs::{ClusterCa, Role};
/// let ca = ClusterCa::new().unwrap();
/// assert_eq!(ca.issue("tv").unwrap().role().unwrap(), Role::Node);
/// let ops = ca.issue_role("ops", Role::Admin).unwrap();
/// assert_eq!(ops.role().unwrap(), Role::Admin);
/// assert_eq!("observer".parse::<Role>().unwrap(), Role::Observer);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A device of the cluster: joins it, hosts services and carries their messages. It
    /// cannot open an admin connection.
    Node,
    /// A person or tool that runs the cluster (`tern`, a dashboard): may open admin
    /// connections to the nodes that list it, and ask anything of them. It cannot join as a
    /// node.
    Admin,
    /// Like an admin, but may only read (services, members, trees, plans, events, stats):
    /// never move, spawn, drain or stop anything.
    Observer,
}

/// The URI prefix of a role's subject alternative name.
const ROLE_URI_PREFIX: &str = "urn:tern:role:";

impl Role {
    /// The role's name, as in its certificate and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Admin => "admin",
            Role::Observer => "observer",
        }
    }

    /// Whether this role may open an admin connection at all.
    pub fn may_administer(self) -> bool {
        matches!(self, Role::Admin | Role::Observer)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "node" => Ok(Role::Node),
            "admin" => Ok(Role::Admin),
            "observer" => Ok(Role::Observer),
            other => Err(Error::Config(format!(
                "role {other:?}: a certificate's role is node, admin or observer"
            ))),
        }
    }
}

/// Days a certificate from [`ClusterCa::issue`] (and `tern ca issue`) is valid by default.
pub const CERT_DAYS_DEFAULT: u64 = 365;

/// The longest a certificate may live, in days (ten years).
pub const CERT_DAYS_MAX: u64 = 3650;

/// Days a cluster CA's own certificate lives (twenty years): past it, no certificate it
/// issued is accepted, and the cluster needs a new CA.
pub const CA_DAYS: u64 = 2 * CERT_DAYS_MAX;

/// The cluster's certificate authority: only nodes holding a certificate it issued can join.
pub struct ClusterCa {
    cert_der: Vec<u8>,
    cert_pem: String,
    key: KeyPair,
}

impl ClusterCa {
    /// Creates a new CA with a fresh key.
    pub fn new() -> Result<Self, Error> {
        use std::time::{Duration, SystemTime};
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = ca_params();
        let now = SystemTime::now();
        params.not_before = now
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or(now)
            .into();
        params.not_after = (now + Duration::from_secs(CA_DAYS * 24 * 3600)).into();
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(ClusterCa {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads a CA written by [`write`](Self::write).
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_pem = read(&dir.join("ca.pem"))?;
        let key_pem = read(&dir.join("ca.key"))?;
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(cert_err)?
            .to_vec();
        Ok(ClusterCa {
            cert_der,
            cert_pem,
            key,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Issues a certificate for node `name`, valid as server and client for
    /// [`CERT_DAYS_DEFAULT`] days (from an hour ago, for clocks that differ a little): a lost
    /// device's certificate stops working in time.
    pub fn issue(&self, name: &str) -> Result<NodeIdentity, Error> {
        self.issue_for_days(name, CERT_DAYS_DEFAULT)
    }

    /// Issues a certificate for `name` in `role`, valid for [`CERT_DAYS_DEFAULT`] days: an
    /// admin's or an observer's for the command line and dashboards, which no node accepts as
    /// a peer.
    ///
    /// ```
    /// # fn demo(ca: &tern::certs::ClusterCa) -> Result<(), tern::Error> {
    /// use tern::certs::Role;
    /// let ops = ca.issue_role("ops", Role::Admin)?;
    /// let wall = ca.issue_role("wall", Role::Observer)?;
    /// # Ok(()) }
    /// ```
    pub fn issue_role(&self, name: &str, role: Role) -> Result<NodeIdentity, Error> {
        self.issue_role_for_days(name, role, CERT_DAYS_DEFAULT)
    }

    /// Issues a certificate for node `name` valid for `days` days (1 to [`CERT_DAYS_MAX`]),
    /// from an hour ago.
    ///
    /// ```
    /// # fn demo(ca: &tern::certs::ClusterCa) -> Result<(), tern::Error> {
    /// let watch = ca.issue_for_days("watch", 30)?;
    /// assert!(ca.issue_for_days("watch", 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn issue_for_days(&self, name: &str, days: u64) -> Result<NodeIdentity, Error> {
        self.issue_role_for_days(name, Role::Node, days)
    }

    /// Issues a certificate for `name` in `role`, valid for `days` days (1 to
    /// [`CERT_DAYS_MAX`]) from an hour ago.
    pub fn issue_role_for_days(
        &self,
        name: &str,
        role: Role,
        days: u64,
    ) -> Result<NodeIdentity, Error> {
        use std::time::{Duration, SystemTime};
        if !(1..=CERT_DAYS_MAX).contains(&days) {
            return Err(Error::Cert(format!(
                "certificate for {name}: {days} days; a certificate lives 1 to {CERT_DAYS_MAX} days"
            )));
        }
        let now = SystemTime::now();
        let start = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
        let end = now + Duration::from_secs(days * 24 * 3600);
        self.issue_with(name, role, Some(start..end))
    }

    /// Issues a certificate for node `name` valid only from `valid.start` to `valid.end`.
    /// Peers refuse it outside that span, with a reason that says so.
    ///
    /// ```
    /// # fn demo(ca: &tern::certs::ClusterCa) -> Result<(), tern::Error> {
    /// use std::time::{Duration, SystemTime};
    /// let now = SystemTime::now();
    /// let tv = ca.issue_valid("tv", now..now + Duration::from_secs(90 * 24 * 3600))?;
    /// # Ok(()) }
    /// ```
    pub fn issue_valid(
        &self,
        name: &str,
        valid: std::ops::Range<std::time::SystemTime>,
    ) -> Result<NodeIdentity, Error> {
        if valid.end <= valid.start {
            return Err(Error::Cert(format!(
                "certificate for {name}: its validity ends before it starts"
            )));
        }
        self.issue_with(name, Role::Node, Some(valid))
    }

    fn issue_with(
        &self,
        name: &str,
        role: Role,
        valid: Option<std::ops::Range<std::time::SystemTime>>,
    ) -> Result<NodeIdentity, Error> {
        let key = KeyPair::generate().map_err(cert_err)?;
        Ok(NodeIdentity {
            cert_der: self.sign(name, role, valid, &key)?,
            key_der: key.serialize_der(),
            ca_der: self.cert_der.clone(),
        })
    }

    /// Issues a certificate for `name` in `role`, valid for `days` days, for the key in a
    /// certificate signing request (DER) that the key signed: the key never leaves the device
    /// that made it (pairing, `tern join`). Whatever else the request asks for is ignored.
    pub fn issue_for_request(
        &self,
        name: &str,
        role: Role,
        days: u64,
        csr_der: &[u8],
    ) -> Result<Vec<u8>, Error> {
        use std::time::{Duration, SystemTime};
        if !(1..=CERT_DAYS_MAX).contains(&days) {
            return Err(Error::Cert(format!(
                "certificate for {name}: {days} days; a certificate lives 1 to {CERT_DAYS_MAX} days"
            )));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| cert_err(format!("certificate request: {e}")))?;
        let now = SystemTime::now();
        let start = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
        let end = now + Duration::from_secs(days * 24 * 3600);
        self.sign(name, role, Some(start..end), &csr.public_key)
    }

    fn sign(
        &self,
        name: &str,
        role: Role,
        valid: Option<std::ops::Range<std::time::SystemTime>>,
        key: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<u8>, Error> {
        check_node_name(name)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_err)?;
        let role_uri = format!("{ROLE_URI_PREFIX}{role}");
        params.subject_alt_names.push(SanType::URI(
            role_uri.as_str().try_into().map_err(cert_err)?,
        ));
        if let Some(valid) = valid {
            params.not_before = valid.start.into();
            params.not_after = valid.end.into();
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(key, &issuer).map_err(cert_err)?;
        Ok(cert.der().to_vec())
    }

    /// A revocation list signed by this CA (DER), numbered `number`, revoking the
    /// certificates with the given serial numbers ([`NodeIdentity::serial`], [`serial_of`]).
    /// A node installs a list only when its number is higher than the one it holds, so each
    /// new list must carry every revocation still wanted and a higher number.
    ///
    /// ```
    /// # fn demo() -> Result<(), tern::Error> {
    /// let ca = tern::certs::ClusterCa::new()?;
    /// let lost = ca.issue("phone")?;
    /// let crl = ca.revocation_list(&[lost.serial()?], 1)?;
    /// let list = tern::trust::Revocations::verify(&crl, ca.cert_der())?;
    /// assert!(list.revokes(&lost.serial()?));
    /// # Ok(()) }
    /// ```
    pub fn revocation_list(&self, serials: &[Vec<u8>], number: u64) -> Result<Vec<u8>, Error> {
        use std::time::{Duration, SystemTime};
        let now = SystemTime::now();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now.into(),
            // Nodes keep a list until a newer one comes; the date is informative.
            next_update: (now + Duration::from_secs(CERT_DAYS_DEFAULT * 24 * 3600)).into(),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: now.into(),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = Issuer::new(ca_params(), &self.key);
        Ok(params.signed_by(&issuer).map_err(cert_err)?.der().to_vec())
    }

    /// Notes in `dir`'s [`ISSUED_FILE`] that the certificate `cert_der` was issued, so that
    /// [`revoke_in`](Self::revoke_in) can find every certificate a name ever had.
    pub fn record_issued(dir: &Path, cert_der: &[u8]) -> Result<(), Error> {
        let line = format!(
            "{} {} {}\n",
            hex(&serial_of(cert_der)?),
            crate::tls::name_from_cert(cert_der)?,
            role_from_cert(cert_der)?
        );
        let path = dir.join(ISSUED_FILE);
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        f.write_all(line.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Revokes every certificate issued to `name` that `dir` knows of (its [`ISSUED_FILE`]
    /// and `NAME.pem`), on top of what `dir`'s [`CRL_FILE`] revoked already, and writes the
    /// new list there with the next number. Returns the list (DER) and what it revokes.
    pub fn revoke_in(
        &self,
        dir: &Path,
        name: &str,
    ) -> Result<(Vec<u8>, crate::trust::Revocations), Error> {
        check_node_name(name)?;
        let mut serials: Vec<Vec<u8>> = Vec::new();
        let issued = dir.join(ISSUED_FILE);
        if issued.exists() {
            for line in read(&issued)?.lines() {
                let mut words = line.split_whitespace();
                if let (Some(serial), Some(n)) = (words.next(), words.next()) {
                    if n == name {
                        serials.push(unhex(serial).ok_or_else(|| {
                            Error::Cert(format!("{}: bad serial {serial:?}", issued.display()))
                        })?);
                    }
                }
            }
        }
        let (cert, _, _) = NodeIdentity::paths(dir, name);
        if cert.exists() {
            let der = CertificateDer::from_pem_slice(read(&cert)?.as_bytes())
                .map_err(|e| cert_err(format!("{}: {e}", cert.display())))?;
            serials.push(serial_of(&der)?);
        }
        if serials.is_empty() {
            return Err(Error::Cert(format!(
                "no certificate for {name} is on record in {}",
                dir.display()
            )));
        }
        let crl_path = dir.join(CRL_FILE);
        let mut number = 1;
        if crl_path.exists() {
            let held = crate::trust::Revocations::verify(&load_crl(&crl_path)?, &self.cert_der)?;
            number = held.number() + 1;
            serials.extend(held.serials().cloned());
        }
        serials.sort();
        serials.dedup();
        let crl = self.revocation_list(&serials, number)?;
        let list = crate::trust::Revocations::verify(&crl, &self.cert_der)?;
        write_file(&crl_path, to_pem("X509 CRL", &crl).as_bytes(), false)?;
        Ok((crl, list))
    }

    /// Writes `ca.pem` and `ca.key` (owner-only) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        write_file(&dir.join("ca.pem"), self.cert_pem.as_bytes(), false)?;
        write_file(
            &dir.join("ca.key"),
            self.key.serialize_pem().as_bytes(),
            true,
        )
    }
}

/// A node's certificate, private key and the cluster CA it trusts.
#[derive(Clone)]
pub struct NodeIdentity {
    /// The node certificate, DER.
    pub cert_der: Vec<u8>,
    /// The node's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The cluster CA certificate, DER.
    pub ca_der: Vec<u8>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeIdentity({:?})", self.name().ok())
    }
}

impl NodeIdentity {
    /// The node name, read from the certificate.
    pub fn name(&self) -> Result<NodeName, Error> {
        crate::tls::name_from_cert(&self.cert_der)
    }

    /// The certificate's role.
    pub fn role(&self) -> Result<Role, Error> {
        role_from_cert(&self.cert_der)
    }

    /// The certificate's serial number (big-endian, without leading zeros): what a
    /// revocation list names.
    pub fn serial(&self) -> Result<Vec<u8>, Error> {
        serial_of(&self.cert_der)
    }

    pub(crate) fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    pub(crate) fn ca(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.ca_der.clone())
    }

    /// Paths of the files [`write`](Self::write) makes for `name` in `dir`:
    /// certificate, key, CA certificate.
    pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
            dir.join("ca.pem"),
        )
    }

    /// Writes `NAME.pem` and `NAME.key` (owner-only) into `dir`, and `ca.pem` if absent.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let name = self.name()?;
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let (cert, key, ca) = Self::paths(dir, name.as_str());
        write_file(
            &cert,
            to_pem("CERTIFICATE", &self.cert_der).as_bytes(),
            false,
        )?;
        let key_pem = to_pem("PRIVATE KEY", &self.key_der);
        write_file(&key, key_pem.as_bytes(), true)?;
        if !ca.exists() {
            write_file(&ca, to_pem("CERTIFICATE", &self.ca_der).as_bytes(), false)?;
        }
        Ok(())
    }

    /// Loads the files written by [`write`](Self::write).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, Error> {
        let cert_der = CertificateDer::from_pem_slice(read(cert)?.as_bytes())
            .map_err(|e| cert_err(format!("{}: {e}", cert.display())))?
            .to_vec();
        let key_der = PrivatePkcs8KeyDer::from_pem_slice(read(key)?.as_bytes())
            .map_err(|e| cert_err(format!("{}: {e}", key.display())))?
            .secret_pkcs8_der()
            .to_vec();
        let ca_der = CertificateDer::from_pem_slice(read(ca)?.as_bytes())
            .map_err(|e| cert_err(format!("{}: {e}", ca.display())))?
            .to_vec();
        Ok(NodeIdentity {
            cert_der,
            key_der,
            ca_der,
        })
    }
}

/// The file in a CA folder where `tern ca issue` notes each certificate: serial (hex), name,
/// role, one per line.
pub const ISSUED_FILE: &str = "issued.txt";

/// The file in a CA folder holding the CA's latest revocation list (PEM).
pub const CRL_FILE: &str = "crl.pem";

/// Reads a revocation list written by [`ClusterCa::revoke_in`] (PEM), as DER.
pub fn load_crl(path: &Path) -> Result<Vec<u8>, Error> {
    use rustls::pki_types::CertificateRevocationListDer;
    CertificateRevocationListDer::from_pem_slice(read(path)?.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| cert_err(format!("{}: {e}", path.display())))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A certificate's serial number (big-endian, without leading zeros).
pub fn serial_of(der: &[u8]) -> Result<Vec<u8>, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Cert(format!("unreadable certificate: {e}")))?;
    Ok(trim_serial(cert.raw_serial()))
}

/// When a certificate starts and stops being valid, in seconds since the Unix epoch.
pub fn validity_of(der: &[u8]) -> Result<(i64, i64), Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Cert(format!("unreadable certificate: {e}")))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Whether `ca_der`'s key signed the certificate `der` (`Err` says why not).
pub fn check_signed_by(der: &[u8], ca_der: &[u8]) -> Result<(), Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Cert(format!("unreadable certificate: {e}")))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| Error::Cert(format!("unreadable CA certificate: {e}")))?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| Error::Cert(format!("not signed by this CA: {e}")))
}

/// A certificate's public key (its DER `SubjectPublicKeyInfo`): what binds a name to one
/// device. A renewed certificate for the same key has the same one.
pub fn key_of(der: &[u8]) -> Result<Vec<u8>, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Cert(format!("unreadable certificate: {e}")))?;
    Ok(cert.public_key().raw.to_vec())
}

/// `raw` without its leading zero bytes, so that one number has one spelling.
pub(crate) fn trim_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

/// The role a certificate names (`urn:tern:role:ROLE`); a certificate that names none is a
/// node's, one that names two or an unknown role is refused.
pub fn role_from_cert(der: &[u8]) -> Result<Role, Error> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Cert(format!("unreadable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::Cert(format!("bad subject alternative names: {e}")))?;
    let mut roles = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(ROLE_URI_PREFIX),
            _ => None,
        });
    match (roles.next(), roles.next()) {
        (None, _) => Ok(Role::Node),
        (Some(one), None) => one
            .parse()
            .map_err(|_| Error::Cert(format!("certificate names an unknown role {one:?}"))),
        (Some(_), Some(_)) => Err(Error::Cert("certificate names more than one role".into())),
    }
}

fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), Error> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    if secret {
        // The file may have existed with wider permissions.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("restricting {}", path.display()), e))?;
    }
    f.write_all(bytes)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_round_trip_and_keys_are_owner_only() {
        let dir = std::env::temp_dir().join(format!("tern-certs-{}", std::process::id()));
        let ca = ClusterCa::new().unwrap();
        ca.write(&dir).unwrap();
        let ca2 = ClusterCa::load(&dir).unwrap();
        let id = ca2.issue("tv").unwrap();
        id.write(&dir).unwrap();
        let (c, k, a) = NodeIdentity::paths(&dir, "tv");
        let back = NodeIdentity::load(&c, &k, &a).unwrap();
        assert_eq!(back.name().unwrap().as_str(), "tv");
        assert_eq!(back.ca_der, ca.cert_der);
        for key in [dir.join("ca.key"), k] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn certificates_live_a_year_unless_told_otherwise() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let ca = ClusterCa::new().unwrap();
        let not_after = |id: &NodeIdentity| {
            let (_, cert) = x509_parser::parse_x509_certificate(&id.cert_der).unwrap();
            cert.validity().not_after.timestamp() as u64
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let day = Duration::from_secs(24 * 3600).as_secs();
        let year = not_after(&ca.issue("tv").unwrap());
        assert!(
            year.abs_diff(now + CERT_DAYS_DEFAULT * day) < 60,
            "{year} vs {now}"
        );
        let month = not_after(&ca.issue_for_days("watch", 30).unwrap());
        let ca_life = {
            let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
            cert.validity().not_after.timestamp() as u64
        };
        assert!(
            ca_life.abs_diff(now + CA_DAYS * day) < 60,
            "{ca_life} vs {now}"
        );
        assert!(month.abs_diff(now + 30 * day) < 60);
        assert!(ca.issue_for_days("watch", 0).is_err());
        assert!(ca.issue_for_days("watch", CERT_DAYS_MAX + 1).is_err());
    }

    #[test]
    fn roles_are_read_back_from_the_certificate() {
        let ca = ClusterCa::new().unwrap();
        for role in [Role::Node, Role::Admin, Role::Observer] {
            let id = ca.issue_role("x", role).unwrap();
            assert_eq!(id.role().unwrap(), role);
            assert_eq!(id.name().unwrap().as_str(), "x");
        }
        assert!("root".parse::<Role>().is_err());
        // A certificate that names two roles, or one nobody knows, is refused.
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::new(ca_params(), &ca.key);
        for uris in [
            &["urn:tern:role:node", "urn:tern:role:admin"][..],
            &["urn:tern:role:root"][..],
        ] {
            let mut p = CertificateParams::new(vec!["x".to_owned()]).unwrap();
            for u in uris {
                p.subject_alt_names
                    .push(SanType::URI((*u).try_into().unwrap()));
            }
            let cert = p.signed_by(&key, &issuer).unwrap();
            assert!(role_from_cert(cert.der()).is_err(), "{uris:?}");
        }
    }

    #[test]
    fn bad_names_refused() {
        let ca = ClusterCa::new().unwrap();
        for bad in ["", "Phone", "a b", "-x", "x-", &"a".repeat(64)] {
            assert!(ca.issue(bad).is_err(), "{bad:?}");
        }
    }
}
