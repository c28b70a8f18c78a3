//! Pairing a new device by a short one-time code, without copying key files.
//!
//! The device that holds the cluster CA offers one pairing, for one name and role
//! ([`PairingServer::bind`]; `tern pair watch`), and shows a code of
//! [`PAIR_CODE_CHARS`] characters. The new device makes its own key and sends a certificate
//! request over TCP ([`join`]; `tern join watch --code CODE --at ADDR`); it gets back its
//! certificate and the CA's. The two sides first run SPAKE2 with the code as the password, so
//! each learns whether the other knows the code without the code crossing the network, and an
//! eavesdropper learns nothing it could test offline. Each side then proves it holds the
//! shared key with an HMAC over the whole exchange: the request under the joining device's
//! key, the certificate under the CA holder's. The private key never leaves the new device.
//!
//! A code is good for one device, for [`PairingOffer::ttl`], and for [`PAIR_TRIES_MAX`]
//! wrong tries; a used, expired or spent code is refused, and every try is reported
//! ([`PairAttempt`]).
//!
//! ```no_run
//! # async fn demo(ca: std::sync::Arc<tern::certs::ClusterCa>) -> Result<(), tern::Error> {
//! use tern::pairing::{join, PairingOffer, PairingServer};
//! let mut server = PairingServer::bind("127.0.0.1:0".parse().unwrap(), ca,
//!     PairingOffer::node("watch")).await?;
//! let (code, at) = (server.code().to_string(), server.local_addr());
//! // On the new device (here, the same process):
//! let (served, joined) = tokio::join!(server.answer_one(), join(at, "watch", &code));
//! let watch = joined?;
//! assert_eq!(watch.name()?.as_str(), "watch");
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::hmac;
use serde::{Deserialize, Serialize};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::certs::{ClusterCa, NodeIdentity, Role};
use crate::error::Error;

/// Characters in a pairing code (from 32 symbols: 40 bits).
pub const PAIR_CODE_CHARS: usize = 8;
/// Wrong tries a code survives; the next try, right or wrong, is refused.
pub const PAIR_TRIES_MAX: u32 = 3;
/// How long a code is good for unless the offer says otherwise.
pub const PAIR_TTL_DEFAULT: Duration = Duration::from_secs(300);
/// How long one try may take, from connection to certificate.
pub const PAIR_TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest pairing message, in bytes.
pub const PAIR_MESSAGE_BYTES_MAX: usize = 64 << 10;

/// The symbols of a code: digits and capitals without I, L, O and U (Crockford's base 32).
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const VERSION: u8 = 1;
const ID_JOINER: &[u8] = b"tern-pair joining device";
const ID_HOLDER: &[u8] = b"tern-pair ca holder";

fn err(what: impl std::fmt::Display) -> Error {
    Error::Pairing(what.to_string())
}

/// A one-time pairing code, as shown (`K7QM-3XRP`).
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode(String);

impl PairingCode {
    /// A fresh code from the operating system's randomness.
    pub fn generate() -> Result<PairingCode, Error> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; PAIR_CODE_CHARS];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| err("no randomness from the operating system"))?;
        // 256 is a multiple of 32: every symbol is equally likely.
        Ok(PairingCode(
            bytes
                .iter()
                .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
                .collect(),
        ))
    }

    /// Reads a code as a person typed it: any case, with or without the dash or spaces, `O`
    /// for zero and `I` or `L` for one.
    pub fn parse(typed: &str) -> Result<PairingCode, Error> {
        let code: String = typed
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .map(|c| match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                other => other,
            })
            .collect();
        if code.len() != PAIR_CODE_CHARS || !code.bytes().all(|b| ALPHABET.contains(&b)) {
            return Err(err(format!(
                "{typed:?} is not a pairing code ({PAIR_CODE_CHARS} letters and digits, like \
                 K7QM-3XRP)"
            )));
        }
        Ok(PairingCode(code))
    }
}

impl std::fmt::Display for PairingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = self.0.split_at(PAIR_CODE_CHARS / 2);
        write!(f, "{a}-{b}")
    }
}

impl std::fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A code in a log is a code given away.
        f.write_str("PairingCode(..)")
    }
}

/// What a pairing gives: the certificate's name, role and lifetime, and how long the code is
/// good for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingOffer {
    /// The new device's name.
    pub name: String,
    /// Its certificate's role.
    pub role: Role,
    /// Days its certificate is valid.
    pub days: u64,
    /// How long the code is good for.
    pub ttl: Duration,
}

impl PairingOffer {
    /// A node certificate for `name`, valid [`CERT_DAYS_DEFAULT`](crate::certs::CERT_DAYS_DEFAULT)
    /// days, with a code good for [`PAIR_TTL_DEFAULT`].
    pub fn node(name: &str) -> PairingOffer {
        PairingOffer {
            name: name.to_owned(),
            role: Role::Node,
            days: crate::certs::CERT_DAYS_DEFAULT,
            ttl: PAIR_TTL_DEFAULT,
        }
    }
}

/// What came of one try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairOutcome {
    /// The device proved it knows the code and got its certificate (serial, hex).
    Paired {
        /// The new certificate's serial number, in hex.
        serial: String,
    },
    /// The device does not know the code.
    WrongCode {
        /// Wrong tries the code survives still.
        tries_left: u32,
    },
    /// The code was used already: a device paired with it.
    AlreadyUsed,
    /// The code's time is over.
    Expired,
    /// Too many wrong tries spent the code.
    Spent,
    /// The device asked for another name than the offer's.
    WrongName(String),
    /// The exchange broke off or made no sense.
    Broken(String),
}

/// One try at pairing, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairAttempt {
    /// Where it came from.
    pub from: SocketAddr,
    /// What came of it.
    pub outcome: PairOutcome,
}

impl std::fmt::Display for PairAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = self.from;
        match &self.outcome {
            PairOutcome::Paired { serial } => write!(f, "{from}: paired (serial {serial})"),
            PairOutcome::WrongCode { tries_left } => {
                write!(f, "{from}: wrong code ({tries_left} wrong tries left)")
            }
            PairOutcome::AlreadyUsed => write!(f, "{from}: refused, the code was used already"),
            PairOutcome::Expired => write!(f, "{from}: refused, the code expired"),
            PairOutcome::Spent => write!(f, "{from}: refused, too many wrong tries"),
            PairOutcome::WrongName(n) => write!(f, "{from}: refused, asked for {n:?}"),
            PairOutcome::Broken(why) => write!(f, "{from}: broken exchange: {why}"),
        }
    }
}

#[derive(Serialize, Deserialize)]
enum PairMsg {
    Hello {
        version: u8,
        name: String,
        #[serde(with = "serde_bytes")]
        spake: Vec<u8>,
    },
    Reply {
        #[serde(with = "serde_bytes")]
        spake: Vec<u8>,
    },
    Request {
        #[serde(with = "serde_bytes")]
        csr: Vec<u8>,
        #[serde(with = "serde_bytes")]
        mac: Vec<u8>,
    },
    Issued {
        #[serde(with = "serde_bytes")]
        cert: Vec<u8>,
        #[serde(with = "serde_bytes")]
        ca: Vec<u8>,
        #[serde(with = "serde_bytes")]
        mac: Vec<u8>,
    },
    Refused {
        reason: String,
    },
}

async fn send(stream: &mut TcpStream, msg: &PairMsg) -> Result<(), Error> {
    let body = rmp_serde::to_vec(msg).map_err(err)?;
    if body.len() > PAIR_MESSAGE_BYTES_MAX {
        return Err(err("message over the bound"));
    }
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    stream.write_all(&out).await.map_err(err)
}

async fn recv(stream: &mut TcpStream) -> Result<PairMsg, Error> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(err)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > PAIR_MESSAGE_BYTES_MAX {
        return Err(err(format!(
            "a {len}-byte message, over the {PAIR_MESSAGE_BYTES_MAX}-byte bound"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(err)?;
    rmp_serde::from_slice(&body).map_err(|e| err(format!("malformed message: {e}")))
}

/// The two sides' keys from the SPAKE2 result: one for the joining device's proof, one for
/// the CA holder's.
fn keys(shared: &[u8]) -> (hmac::Key, hmac::Key) {
    let root = hmac::Key::new(hmac::HMAC_SHA256, shared);
    let derive =
        |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&root, label).as_ref());
    (derive(b"tern-pair joiner"), derive(b"tern-pair holder"))
}

/// Everything both sides saw, then `parts`, under `key`.
fn transcript(spake_a: &[u8], spake_b: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut t = Vec::new();
    for part in [spake_a, spake_b].iter().chain(parts) {
        t.extend_from_slice(&(part.len() as u64).to_be_bytes());
        t.extend_from_slice(part);
    }
    t
}

/// The CA holder's side of one pairing offer.
pub struct PairingServer {
    listener: TcpListener,
    ca: Arc<ClusterCa>,
    offer: PairingOffer,
    code: PairingCode,
    deadline: Instant,
    wrong_tries: u32,
    paired: Option<Vec<u8>>,
}

impl PairingServer {
    /// Listens on `addr` for the device `offer` names, with a fresh code.
    pub async fn bind(
        addr: SocketAddr,
        ca: Arc<ClusterCa>,
        offer: PairingOffer,
    ) -> Result<PairingServer, Error> {
        crate::certs::check_node_name(&offer.name)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("listening for pairing on {addr}"), e))?;
        Ok(PairingServer {
            listener,
            ca,
            deadline: Instant::now() + offer.ttl,
            offer,
            code: PairingCode::generate()?,
            wrong_tries: 0,
            paired: None,
        })
    }

    /// The code to show to the person pairing the device.
    pub fn code(&self) -> &PairingCode {
        &self.code
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Whether a device has paired with the code.
    pub fn is_paired(&self) -> bool {
        self.paired.is_some()
    }

    /// The certificate (DER) the paired device got, once one has.
    pub fn issued(&self) -> Option<&[u8]> {
        self.paired.as_deref()
    }

    /// When the code stops being good.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Waits for one try and answers it (within [`PAIR_TRY_TIMEOUT`]).
    pub async fn answer_one(&mut self) -> Result<PairAttempt, Error> {
        let (mut stream, from) = self
            .listener
            .accept()
            .await
            .map_err(|e| Error::io("accepting a pairing connection", e))?;
        let outcome = match tokio::time::timeout(PAIR_TRY_TIMEOUT, self.answer(&mut stream)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => PairOutcome::Broken(e.to_string()),
            Err(_) => {
                PairOutcome::Broken(format!("no answer within {} s", PAIR_TRY_TIMEOUT.as_secs()))
            }
        };
        let refusal = match &outcome {
            PairOutcome::Paired { .. } | PairOutcome::Broken(_) => None,
            PairOutcome::WrongCode { .. } => Some("wrong code".to_owned()),
            PairOutcome::AlreadyUsed => Some("this code was used already".to_owned()),
            PairOutcome::Expired => Some("this code expired".to_owned()),
            PairOutcome::Spent => Some("this code is spent: too many wrong tries".to_owned()),
            PairOutcome::WrongName(n) => {
                Some(format!("this code is for {}, not {n}", self.offer.name))
            }
        };
        if let Some(reason) = refusal {
            // The refusal is a courtesy; the try is over either way.
            let _ = send(&mut stream, &PairMsg::Refused { reason }).await;
        }
        let attempt = PairAttempt { from, outcome };
        tracing::info!(attempt = %attempt, "pairing try");
        Ok(attempt)
    }

    async fn answer(&mut self, stream: &mut TcpStream) -> Result<PairOutcome, Error> {
        let PairMsg::Hello {
            version,
            name,
            spake: spake_a,
        } = recv(stream).await?
        else {
            return Ok(PairOutcome::Broken("expected hello".into()));
        };
        if version != VERSION {
            return Ok(PairOutcome::Broken(format!("pairing version {version}")));
        }
        if self.paired.is_some() {
            return Ok(PairOutcome::AlreadyUsed);
        }
        if Instant::now() >= self.deadline {
            return Ok(PairOutcome::Expired);
        }
        if self.wrong_tries >= PAIR_TRIES_MAX {
            return Ok(PairOutcome::Spent);
        }
        if name != self.offer.name {
            return Ok(PairOutcome::WrongName(name));
        }
        let (spake, spake_b) = Spake2::<Ed25519Group>::start_b(
            &Password::new(self.code.0.as_bytes()),
            &Identity::new(ID_JOINER),
            &Identity::new(ID_HOLDER),
        );
        send(
            stream,
            &PairMsg::Reply {
                spake: spake_b.clone(),
            },
        )
        .await?;
        let shared = spake
            .finish(&spake_a)
            .map_err(|e| err(format!("key exchange: {e}")))?;
        let (joiner, holder) = keys(&shared);
        let PairMsg::Request { csr, mac } = recv(stream).await? else {
            return Ok(PairOutcome::Broken("expected a certificate request".into()));
        };
        if hmac::verify(&joiner, &transcript(&spake_a, &spake_b, &[&csr]), &mac).is_err() {
            self.wrong_tries += 1;
            return Ok(PairOutcome::WrongCode {
                tries_left: PAIR_TRIES_MAX - self.wrong_tries,
            });
        }
        let cert =
            self.ca
                .issue_for_request(&self.offer.name, self.offer.role, self.offer.days, &csr)?;
        let ca = self.ca.cert_der().to_vec();
        let mac = hmac::sign(&holder, &transcript(&spake_a, &spake_b, &[&cert, &ca]));
        send(
            stream,
            &PairMsg::Issued {
                cert: cert.clone(),
                ca,
                mac: mac.as_ref().to_vec(),
            },
        )
        .await?;
        let serial = crate::certs::hex(&crate::certs::serial_of(&cert)?);
        self.paired = Some(cert);
        Ok(PairOutcome::Paired { serial })
    }
}

/// The joining device's side: makes a key, proves it knows `code` to the CA holder at `at`,
/// and returns its certificate for `name` (with its key and the CA's certificate; write it
/// with [`NodeIdentity::write`]). Fails with the holder's reason when it refuses, and when
/// the holder cannot prove it knows the code.
pub async fn join(at: SocketAddr, name: &str, code: &str) -> Result<NodeIdentity, Error> {
    crate::certs::check_node_name(name)?;
    let code = PairingCode::parse(code)?;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let csr = rcgen::CertificateParams::new(vec![name.to_owned()])
        .and_then(|p| p.serialize_request(&key))
        .map_err(err)?
        .der()
        .to_vec();
    let mut stream = tokio::time::timeout(PAIR_TRY_TIMEOUT, TcpStream::connect(at))
        .await
        .map_err(|_| err(format!("no answer from {at}")))?
        .map_err(|e| Error::io(format!("connecting to {at} to pair"), e))?;
    let exchange = async {
        let (spake, spake_a) = Spake2::<Ed25519Group>::start_a(
            &Password::new(code.0.as_bytes()),
            &Identity::new(ID_JOINER),
            &Identity::new(ID_HOLDER),
        );
        send(
            &mut stream,
            &PairMsg::Hello {
                version: VERSION,
                name: name.to_owned(),
                spake: spake_a.clone(),
            },
        )
        .await?;
        let spake_b = match recv(&mut stream).await? {
            PairMsg::Reply { spake } => spake,
            PairMsg::Refused { reason } => return Err(err(format!("refused: {reason}"))),
            _ => return Err(err("unexpected answer to hello")),
        };
        let shared = spake
            .finish(&spake_b)
            .map_err(|e| err(format!("key exchange: {e}")))?;
        let (joiner, holder) = keys(&shared);
        let mac = hmac::sign(&joiner, &transcript(&spake_a, &spake_b, &[&csr]));
        send(
            &mut stream,
            &PairMsg::Request {
                csr: csr.clone(),
                mac: mac.as_ref().to_vec(),
            },
        )
        .await?;
        match recv(&mut stream).await? {
            PairMsg::Issued { cert, ca, mac } => {
                hmac::verify(
                    &holder,
                    &transcript(&spake_a, &spake_b, &[&cert, &ca]),
                    &mac,
                )
                .map_err(|_| {
                    err("the other side does not know the code: it is not the CA holder")
                })?;
                Ok((cert, ca))
            }
            PairMsg::Refused { reason } => Err(err(format!("refused: {reason}"))),
            _ => Err(err("unexpected answer to the certificate request")),
        }
    };
    let (cert_der, ca_der) = tokio::time::timeout(PAIR_TRY_TIMEOUT, exchange)
        .await
        .map_err(|_| err(format!("no answer from {at} in time")))??;
    let identity = NodeIdentity {
        cert_der,
        key_der: key.serialize_der(),
        ca_der,
    };
    // The certificate must be for this name and this key.
    if identity.name()?.as_str() != name {
        return Err(err(format!("the certificate is for {}", identity.name()?)));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&identity.cert_der)
        .map_err(|e| err(format!("unreadable certificate: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(err("the certificate is for another key"));
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    #[test]
    fn codes_read_back_however_they_are_typed_and_never_print_in_debug() {
        let code = PairingCode::generate().expect("a code");
        let shown = code.to_string();
        assert_eq!(shown.len(), PAIR_CODE_CHARS + 1);
        assert_eq!(
            PairingCode::parse(&shown.to_lowercase()).ok(),
            Some(code.clone())
        );
        assert_eq!(
            PairingCode::parse(&shown.replace('-', " ")).ok(),
            Some(code.clone())
        );
        assert_eq!(
            PairingCode::parse("o1lI-0000").ok().map(|c| c.0),
            Some("01110000".into())
        );
        assert!(PairingCode::parse("K7QM-3XR").is_err());
        assert!(PairingCode::parse("K7QM-3XRU").is_err());
        assert_eq!(format!("{code:?}"), "PairingCode(..)");
    }

    /// A message announced longer than the bound is refused from its length, before any
    /// room is made for it; the server reports the try as broken and keeps its code.
    #[test]
    fn an_oversize_message_is_refused_from_its_length() {
        let ca = std::sync::Arc::new(ClusterCa::new().expect("a CA"));
        let (attempt, still_good) = run(async {
            let mut server = PairingServer::bind(
                "127.0.0.1:0".parse().expect("an address"),
                ca,
                PairingOffer::node("watch"),
            )
            .await
            .expect("a server");
            let at = server.local_addr();
            let client = async {
                let mut s = TcpStream::connect(at).await.expect("connected");
                let len = (PAIR_MESSAGE_BYTES_MAX as u32 + 1).to_be_bytes();
                s.write_all(&len).await.expect("sent");
                // Wait for the server to close its side.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            };
            let (attempt, ()) = tokio::join!(server.answer_one(), client);
            (attempt.expect("a try"), !server.is_paired())
        });
        match attempt.outcome {
            PairOutcome::Broken(why) => assert!(why.contains("bound"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(still_good);
    }

    /// A holder that does not know the code answers with a certificate anyway: the device
    /// refuses it, since the holder cannot prove the key.
    #[test]
    fn a_holder_without_the_code_is_not_believed() {
        let ca = ClusterCa::new().expect("a CA");
        let got = run(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
            let at = listener.local_addr().expect("its address");
            let fake = async {
                let (mut s, _) = listener.accept().await.expect("the device");
                let Ok(PairMsg::Hello { spake: spake_a, .. }) = recv(&mut s).await else {
                    panic!("no hello");
                };
                let (spake, spake_b) = Spake2::<Ed25519Group>::start_b(
                    &Password::new(b"GUESSED1"),
                    &Identity::new(ID_JOINER),
                    &Identity::new(ID_HOLDER),
                );
                send(
                    &mut s,
                    &PairMsg::Reply {
                        spake: spake_b.clone(),
                    },
                )
                .await
                .expect("sent");
                let shared = spake.finish(&spake_a).expect("a key");
                let (_, holder) = keys(&shared);
                let Ok(PairMsg::Request { csr, .. }) = recv(&mut s).await else {
                    panic!("no request");
                };
                let cert = ca
                    .issue_for_request("watch", Role::Node, 30, &csr)
                    .expect("a certificate");
                let ca_der = ca.cert_der().to_vec();
                let mac = hmac::sign(&holder, &transcript(&spake_a, &spake_b, &[&cert, &ca_der]));
                send(
                    &mut s,
                    &PairMsg::Issued {
                        cert,
                        ca: ca_der,
                        mac: mac.as_ref().to_vec(),
                    },
                )
                .await
                .expect("sent");
            };
            let code = PairingCode::generate().expect("a code").to_string();
            let (_, got) = tokio::join!(fake, join(at, "watch", &code));
            got
        });
        let why = got.expect_err("a fake holder was believed").to_string();
        assert!(why.contains("does not know the code"), "{why}");
    }
}
