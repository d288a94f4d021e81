//! Signed and encrypted snapshots on the node, with the keys the node's config names
//! ([`crate::config::TrustSettings`]).
//!
//! Writing: snapshot -> age encryption (when recipients are configured) -> minisign signing
//! (when a signing key is) -> storage, so the signature covers the stored bytes and can be
//! checked before anything is decrypted. The signature goes beside the snapshot
//! (`<snapshot>.minisig`, as `minisign -S` names it), before the storage manifest, whose
//! digest the signature's trusted comment names.
//!
//! Reading: with a trust set, the signature must exist and name a trusted key before a byte
//! of the snapshot is read; the stored bytes are hashed as the verify pass reads them, and
//! the verdict comes before any map is created or changed. Later passes over the same
//! snapshot are bound to the verified bytes by their SHA-256 and size. An age stream
//! (recognised by its header) is decrypted with the node's identities.

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, Mutex};

use mapsnap::storage::DigestCheck;
use mapsnap::trust::{
    Identities, KeyId, Recipient, SealPolicy, SealWriter, SecretKey, StreamVerifier, TrustError,
    TrustSet, Verified, decrypt_reader,
};

use crate::config::TrustSettings;
use crate::error::{HookError, Result};

/// How an age stream begins.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// The largest signature file read (a minisign signature is a few hundred bytes).
pub const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

pub use mapsnap::trust::SIGNATURE_SUFFIX;

/// The node's keys, loaded from the files its config names.
#[derive(Default)]
pub struct NodeTrust {
    set: Option<TrustSet>,
    identities: Option<Identities>,
    signer: Option<SecretKey>,
    recipients: Vec<Recipient>,
}

impl std::fmt::Debug for NodeTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTrust")
            .field("trust_set", &self.set)
            .field("identities", &self.identities.as_ref().map(Identities::len))
            .field("signer", &self.signer_key_id())
            .field("recipients", &self.recipients)
            .finish()
    }
}

fn trust_err(what: impl Into<String>) -> impl FnOnce(TrustError) -> HookError {
    let what = what.into();
    move |source| HookError::Trust { what, source }
}

impl NodeTrust {
    /// No keys: snapshots are written in clear and unsigned, signatures are not checked.
    pub fn none() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reads every key file `s` names; a file that is missing or not a key is an error
    /// naming it (a node that should sign or verify must not silently stop doing so).
    pub fn load(s: &TrustSettings) -> Result<Arc<Self>> {
        let set = if s.trust_keys.is_empty() {
            None
        } else {
            Some(TrustSet::from_paths(&s.trust_keys).map_err(trust_err("[hook] trust_keys"))?)
        };
        let identities = if s.identities.is_empty() {
            None
        } else {
            Some(Identities::from_files(&s.identities).map_err(trust_err("[hook] identities"))?)
        };
        let signer = match &s.signing_key {
            Some(p) => {
                Some(SecretKey::from_file(p, None).map_err(trust_err("[hook] signing_key"))?)
            }
            None => None,
        };
        let mut recipients = Vec::new();
        for p in &s.recipients {
            recipients.extend(Recipient::from_file(p).map_err(trust_err("[hook] recipients"))?);
        }
        Ok(Arc::new(Self {
            set,
            identities,
            signer,
            recipients,
        }))
    }

    /// Whether restores check signatures (a trust set is configured).
    pub fn verifies(&self) -> bool {
        self.set.is_some()
    }

    pub fn signer_key_id(&self) -> Option<KeyId> {
        self.signer.as_ref().map(SecretKey::key_id)
    }

    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Wraps a snapshot's destination: encrypts and signs as configured (the library's
    /// [`SealPolicy`]; sign once the manifest's bytes are known, see
    /// [`mapsnap::trust::Sealed`]).
    pub fn seal<W: Write>(&self, inner: W) -> Result<SealWriter<W>> {
        SealPolicy::new(self.signer.clone(), self.recipients.clone())
            .seal(inner)
            .map_err(trust_err("encrypting the snapshot"))
    }

    /// Checks `signature` (the `.minisig` beside `what`, None: there is none) against the
    /// trust set, before any of the data is read: format, a trusted key, the trusted comment.
    /// Without a trust set nothing is checked (None).
    pub fn verifier(&self, signature: Option<&[u8]>, what: &str) -> Result<Option<StreamVerifier>> {
        let Some(set) = &self.set else {
            return Ok(None);
        };
        let sig = signature.ok_or_else(|| {
            HookError::refused(
                format!("snapshot {what}"),
                format!(
                    "it is not signed (no {what}{SIGNATURE_SUFFIX} beside it) and this node \
                     accepts only snapshots signed by a trusted key ([hook] trust_keys)"
                ),
            )
        })?;
        set.verifier(sig)
            .map(Some)
            .map_err(trust_err(format!("snapshot {what}")))
    }

    /// The plaintext of a stored snapshot: `raw` hashed for `check` (the verify pass) or
    /// bound to the bytes an earlier pass verified, then decrypted when it is an age stream.
    /// Call [`Opened::finish`] once the consumer is done.
    pub fn open(&self, raw: Box<dyn Read + Send>, check: Check, what: &str) -> Result<Opened> {
        let (raw, tap): (Box<dyn Read + Send>, _) = match check {
            Check::None => (raw, None),
            Check::Verify(verifier) => {
                let state = Arc::new(Mutex::new(TapState {
                    inner: raw,
                    verifier: Some(*verifier),
                }));
                (Box::new(Tap(state.clone())), Some(state))
            }
            Check::Bound { sha256, size } => {
                (Box::new(DigestCheck::new(raw, what, sha256, size)), None)
            }
        };
        let (head, raw) = peek(raw, AGE_MAGIC.len())
            .map_err(|e| HookError::io(format!("reading snapshot {what}"), e))?;
        let encrypted = head == AGE_MAGIC;
        let joined: Box<dyn Read + Send> = Box::new(Cursor::new(head).chain(raw));
        let reader: Box<dyn Read + Send> = if encrypted {
            let ids = self.identities.as_ref().ok_or_else(|| {
                HookError::refused(
                    format!("snapshot {what}"),
                    "it is age-encrypted and this node has no identities to decrypt it \
                     ([hook] identities)",
                )
            })?;
            Box::new(decrypt_reader(joined, ids).map_err(trust_err(format!("snapshot {what}")))?)
        } else {
            joined
        };
        Ok(Opened {
            reader,
            tap,
            encrypted,
            what: what.to_string(),
        })
    }
}

/// What a read of a stored snapshot checks its bytes against.
#[derive(Debug)]
pub enum Check {
    /// Nothing (no trust set).
    None,
    /// The signature, whose verifier hashes the bytes as they are read.
    Verify(Box<StreamVerifier>),
    /// The digest of the bytes a verified pass read (a later pass reads the same bytes).
    Bound { sha256: [u8; 32], size: u64 },
}

/// A snapshot opened for one pass ([`NodeTrust::open`]).
pub struct Opened {
    reader: Box<dyn Read + Send>,
    tap: Option<Arc<Mutex<TapState>>>,
    /// The stored stream is age-encrypted.
    pub encrypted: bool,
    what: String,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("what", &self.what)
            .field("encrypted", &self.encrypted)
            .field("verifying", &self.tap.is_some())
            .finish_non_exhaustive()
    }
}

impl Opened {
    /// Wraps the plaintext reader (e.g. in a digest check).
    pub fn wrap(mut self, f: impl FnOnce(Box<dyn Read + Send>) -> Box<dyn Read + Send>) -> Self {
        self.reader = f(self.reader);
        self
    }

    /// The plaintext, for the consumer (which may stop before the end).
    pub fn reader(&mut self) -> &mut (dyn Read + Send) {
        &mut *self.reader
    }

    /// Reads what the consumer left, so the age stream's last chunk, the digest checks and
    /// the whole signed stream are checked, then the signature's verdict (None: no
    /// signature was checked on this pass).
    pub fn finish(mut self) -> Result<Option<Verified>> {
        if let Err(e) = io::copy(&mut self.reader, &mut io::sink()) {
            let failed = HookError::io(format!("reading snapshot {}", self.what), e);
            return Err(self.refuted().unwrap_or(failed));
        }
        self.verdict()
    }

    /// After the consumer failed on this pass: the signature's refusal when the stored bytes
    /// are not the signed ones (an alteration is then reported as such, not as the damage it
    /// caused further down); None when the signature holds or was not checked.
    pub fn refuted(mut self) -> Option<HookError> {
        let tap = self.tap.as_ref()?;
        {
            let mut g = tap.lock().ok()?;
            let TapState { inner, verifier } = &mut *g;
            let v = verifier.as_mut()?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match inner.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => v.update(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return None,
                }
            }
        }
        self.verdict().err()
    }

    fn verdict(&mut self) -> Result<Option<Verified>> {
        let Some(tap) = self.tap.take() else {
            return Ok(None);
        };
        let v = tap
            .lock()
            .map_err(|_| HookError::Other("the signature check was poisoned".into()))?
            .verifier
            .take()
            .ok_or_else(|| HookError::Other("the signature was already checked".into()))?;
        v.finish()
            .map(Some)
            .map_err(trust_err(format!("snapshot {}", self.what)))
    }
}

/// The stored stream and the signature verifier it feeds.
struct TapState {
    inner: Box<dyn Read + Send>,
    verifier: Option<StreamVerifier>,
}

/// Feeds what passes through to a signature verifier; shared with [`Opened`], which can
/// read the rest of the stored stream itself when the consumer failed.
struct Tap(Arc<Mutex<TapState>>);

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = self
            .0
            .lock()
            .map_err(|_| io::Error::other("the signature check was poisoned"))?;
        let n = g.inner.read(buf)?;
        if let Some(v) = g.verifier.as_mut() {
            v.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Reads up to `n` bytes (fewer only at the end of the stream) and returns them with the rest.
fn peek<R: Read>(mut r: R, n: usize) -> io::Result<(Vec<u8>, R)> {
    let mut head = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(got);
    Ok((head, r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn keys(dir: &std::path::Path) -> TrustSettings {
        let pair = mapsnap::trust::keygen(None).expect("keygen");
        let (public, secret) = (dir.join("k.pub"), dir.join("k.key"));
        pair.write_files(&public, &secret).expect("write keys");
        TrustSettings {
            trust_keys: vec![public],
            signing_key: Some(secret),
            ..TrustSettings::default()
        }
    }

    fn sealed(t: &NodeTrust, data: &[u8]) -> (Vec<u8>, Option<mapsnap::trust::Signed>) {
        let mut w = t.seal(Vec::new()).expect("seal");
        w.write_all(data).expect("write");
        let written = mapsnap::format::StreamDigest {
            sha256: sha2::Sha256::digest(data).into(),
            bytes: data.len() as u64,
        };
        let (stored, sealed) = w.finish(&written).expect("finish");
        (stored, sealed.sign(Some(b"{}")).expect("sign"))
    }

    fn read_back(
        t: &NodeTrust,
        stored: &[u8],
        sig: Option<&[u8]>,
    ) -> Result<(Vec<u8>, Option<Verified>)> {
        let v = t
            .verifier(sig, "s")?
            .map_or(Check::None, |v| Check::Verify(Box::new(v)));
        let mut o = t.open(Box::new(Cursor::new(stored.to_vec())), v, "s")?;
        let mut out = Vec::new();
        o.reader()
            .read_to_end(&mut out)
            .map_err(|e| HookError::io("read", e))?;
        Ok((out, o.finish()?))
    }

    #[test]
    fn signed_round_trip_and_refusals() {
        let d = tempfile::tempdir().expect("tempdir");
        let t = NodeTrust::load(&keys(d.path())).expect("load");
        let (stored, signed) = sealed(&t, b"snapshot bytes");
        let signed = signed.expect("signed");
        assert_eq!(
            stored, b"snapshot bytes",
            "signing leaves the bytes as they are"
        );
        assert!(
            signed
                .trusted_comment
                .contains(&mapsnap::trust::manifest_digest(b"{}"))
        );
        let (plain, v) = read_back(&t, &stored, Some(&signed.signature)).expect("verifies");
        assert_eq!(plain, b"snapshot bytes");
        assert_eq!(v.expect("checked").key_id, signed.key_id);

        let e = read_back(&t, &stored, None)
            .expect_err("unsigned")
            .to_string();
        assert!(e.contains("not signed"), "{e}");
        let mut altered = stored.clone();
        altered[3] ^= 1;
        let e = read_back(&t, &altered, Some(&signed.signature))
            .expect_err("altered")
            .to_string();
        assert!(e.contains("does not match the data"), "{e}");

        let d2 = tempfile::tempdir().expect("tempdir");
        let stranger = NodeTrust::load(&keys(d2.path())).expect("load");
        let e = read_back(&stranger, &stored, Some(&signed.signature))
            .expect_err("other key")
            .to_string();
        assert!(e.contains("not in the trust set"), "{e}");
    }

    #[test]
    fn encrypted_needs_an_identity() {
        let d = tempfile::tempdir().expect("tempdir");
        // The real age-keygen, as an administrator makes the node's identity.
        let id_file = d.path().join("age.key");
        let made = std::process::Command::new("age-keygen")
            .arg("-o")
            .arg(&id_file)
            .output()
            .expect("age-keygen (scripts/install-trust-tools.sh)");
        assert!(made.status.success());
        let public = std::process::Command::new("age-keygen")
            .arg("-y")
            .arg(&id_file)
            .output()
            .expect("age-keygen -y");
        let rcpt = d.path().join("recipients.txt");
        std::fs::write(&rcpt, [b"# node\n".as_slice(), &public.stdout].concat())
            .expect("recipients");
        let writer = NodeTrust::load(&TrustSettings {
            recipients: vec![rcpt],
            ..TrustSettings::default()
        })
        .expect("load");
        let (stored, signed) = sealed(&writer, b"secret map entries");
        assert!(signed.is_none());
        assert!(stored.starts_with(AGE_MAGIC));
        assert!(!stored.windows(6).any(|w| w == b"secret"));
        let e = read_back(&NodeTrust::default(), &stored, None)
            .expect_err("no identity")
            .to_string();
        assert!(e.contains("no identities"), "{e}");
        let reader = NodeTrust::load(&TrustSettings {
            identities: vec![id_file],
            ..TrustSettings::default()
        })
        .expect("load");
        let (plain, _) = read_back(&reader, &stored, None).expect("decrypts");
        assert_eq!(plain, b"secret map entries");
    }
}
