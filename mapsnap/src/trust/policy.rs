//! What callers use: a [`SealPolicy`] to sign and encrypt a snapshot as it is written, an
//! [`OpenPolicy`] to check and decrypt one as it is read. See the module docs for the flow.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::Digest as _;

use super::crypt::{DecryptingReader, EncryptingWriter, Identities, Recipient};
use super::hasher::{StreamHasher, Want};
use super::keys::{KeyId, SecretKey};
use super::sign::{Signed, SignedFacts, sign_prehashed};
use super::verify::{StreamVerifier, TrustSet, Verified};
use super::{Result, TrustError, decrypt_reader, encrypt_writer};
use crate::format::StreamDigest;
use crate::storage::Manifest;

/// The first bytes of every age stream (and of no mapsnap snapshot).
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// The digest of a manifest as a signature names it: `sha256:<hex>` of its exact bytes.
pub fn manifest_digest(manifest_bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(manifest_bytes))
    )
}

/// How snapshots are written: signed with a minisign key, encrypted to age recipients, both
/// or neither (the default, [`SealPolicy::default`], changes nothing).
#[derive(Clone, Default)]
pub struct SealPolicy {
    key: Option<SecretKey>,
    recipients: Vec<Recipient>,
}

impl fmt::Debug for SealPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealPolicy")
            .field("key", &self.key.as_ref().map(SecretKey::key_id))
            .field("recipients", &self.recipients)
            .finish()
    }
}

impl SealPolicy {
    pub fn new(key: Option<SecretKey>, recipients: Vec<Recipient>) -> Self {
        Self { key, recipients }
    }

    /// Loads the signing key (a minisign secret key file; `password` for a protected one)
    /// and the recipients, each an `age1...` recipient, an `ssh-ed25519 ...` key, or
    /// `@FILE` naming a recipients file (one per line, `#` comments, as `age -R` reads).
    pub fn load<S: AsRef<str>>(
        key: Option<&Path>,
        password: Option<&str>,
        recipients: &[S],
    ) -> Result<Self> {
        let key = key.map(|p| SecretKey::from_file(p, password)).transpose()?;
        Ok(Self {
            key,
            recipients: Recipient::parse_args(recipients)?,
        })
    }

    pub fn signs(&self) -> bool {
        self.key.is_some()
    }

    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// The key id signatures will name.
    pub fn key_id(&self) -> Option<KeyId> {
        self.key.as_ref().map(SecretKey::key_id)
    }

    pub fn recipients(&self) -> &[Recipient] {
        &self.recipients
    }

    /// Wraps the destination (a storage writer, a file): the snapshot writer writes its
    /// plaintext into the result. With recipients the age header is written now.
    pub fn seal<W: Write>(&self, inner: W) -> Result<SealWriter<W>> {
        // The snapshot writer already hashes its plaintext with SHA-256: a plaintext stream
        // needs only the BLAKE2b minisign signs; a ciphertext needs its own SHA-256 (the
        // manifest and the signature name the stored bytes).
        let want = Want {
            blake2b: self.signs(),
            sha256: self.encrypts(),
        };
        let tap = Tap {
            inner,
            hasher: (want.blake2b || want.sha256).then(|| StreamHasher::new(want)),
            size: 0,
        };
        let out = if self.encrypts() {
            Out::Encrypted(encrypt_writer(tap, &self.recipients)?)
        } else {
            Out::Plain(tap)
        };
        Ok(SealWriter {
            out,
            key: self.key.clone(),
        })
    }
}

/// Counts and hashes exactly the bytes its inner writer accepted.
struct Tap<W: Write> {
    inner: W,
    hasher: Option<StreamHasher>,
    size: u64,
}

impl<W: Write> Write for Tap<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Out<W: Write> {
    Plain(Tap<W>),
    Encrypted(EncryptingWriter<Tap<W>>),
}

/// A snapshot being sealed: write the plaintext snapshot into it, then
/// [`SealWriter::finish`].
pub struct SealWriter<W: Write> {
    out: Out<W>,
    key: Option<SecretKey>,
}

impl<W: Write> fmt::Debug for SealWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealWriter")
            .field("encrypted", &matches!(self.out, Out::Encrypted(_)))
            .field("key", &self.key.as_ref().map(SecretKey::key_id))
            .finish_non_exhaustive()
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.out {
            Out::Plain(t) => t.write(buf),
            Out::Encrypted(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::Plain(t) => t.flush(),
            Out::Encrypted(e) => e.flush(),
        }
    }
}

impl<W: Write> SealWriter<W> {
    /// Ends the stream (the last age chunk) and returns the destination, to commit, and what
    /// is needed to sign. `written` is the digest of the plaintext the snapshot writer
    /// reported (`DumpReport::digest`), reused instead of hashing the stream twice.
    pub fn finish(self, written: &StreamDigest) -> Result<(W, Sealed)> {
        let (mut tap, encrypted) = match self.out {
            Out::Plain(t) => (t, false),
            Out::Encrypted(e) => (e.finish()?, true),
        };
        tap.flush()
            .map_err(|e| TrustError::io("flushing the sealed stream", e))?;
        let digests = tap.hasher.take().map(StreamHasher::finish).transpose()?;
        let stored = match digests.and_then(|d| d.sha256) {
            Some(sha256) => StreamDigest {
                sha256,
                bytes: tap.size,
            },
            None => {
                if written.bytes != tap.size {
                    return Err(TrustError::Crypto(format!(
                        "the snapshot writer reported {} bytes, {} reached the destination",
                        written.bytes, tap.size
                    )));
                }
                *written
            }
        };
        let pending = match (self.key, digests.and_then(|d| d.blake2b)) {
            (Some(k), Some(prehash)) => Some((k, prehash)),
            _ => None,
        };
        Ok((
            tap.inner,
            Sealed {
                stored,
                encrypted,
                pending,
            },
        ))
    }
}

/// A sealed stream, written: its stored digest and, when signing, the pending signature.
pub struct Sealed {
    stored: StreamDigest,
    encrypted: bool,
    pending: Option<(SecretKey, [u8; 64])>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("stored", &self.stored)
            .field("encrypted", &self.encrypted)
            .field("key", &self.key_id())
            .finish()
    }
}

impl Sealed {
    /// SHA-256 and size of the bytes stored (the ciphertext when encrypted).
    pub fn stored(&self) -> &StreamDigest {
        &self.stored
    }

    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    pub fn key_id(&self) -> Option<KeyId> {
        self.pending.as_ref().map(|(k, _)| k.key_id())
    }

    /// Makes a manifest built from the dump report describe the stored bytes: a download is
    /// checked against the manifest before it is decrypted.
    pub fn apply(&self, manifest: &mut Manifest) {
        manifest.sha256 = hex::encode(self.stored.sha256);
        manifest.size = self.stored.bytes;
    }

    /// The `.minisig` file to store beside the snapshot (`None` when not signing). Its
    /// trusted comment names the stored SHA-256 and size and, given the exact bytes of the
    /// manifest stored beside the snapshot, the manifest's digest, so neither can be swapped.
    pub fn sign(&self, manifest_bytes: Option<&[u8]>) -> Result<Option<Signed>> {
        let Some((key, prehash)) = &self.pending else {
            return Ok(None);
        };
        let facts = SignedFacts {
            sha256: self.stored.sha256,
            size: self.stored.bytes,
            manifest_digest: manifest_bytes.map(manifest_digest),
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
        };
        let trusted_comment = facts.to_comment();
        Ok(Some(Signed {
            signature: sign_prehashed(key, prehash, &trusted_comment),
            key_id: key.key_id(),
            trusted_comment,
            facts,
        }))
    }
}

/// How snapshots are read: with a trust set, only snapshots signed by one of its keys are
/// accepted; with identities, age-encrypted snapshots are decrypted. The default accepts
/// unsigned plaintext snapshots, as mapsnap always did.
#[derive(Clone, Default)]
pub struct OpenPolicy {
    trust: Option<TrustSet>,
    identities: Arc<Identities>,
}

impl fmt::Debug for OpenPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenPolicy")
            .field("trust", &self.trust)
            .field("identities", &self.identities)
            .finish()
    }
}

impl OpenPolicy {
    pub fn new(trust: Option<TrustSet>, identities: Identities) -> Self {
        Self {
            trust,
            identities: Arc::new(identities),
        }
    }

    /// `trust`: minisign public key files and directories of `*.pub` files (an empty list
    /// means no trust set: signatures are not required). `identities`: age identity files
    /// or unencrypted OpenSSH private keys.
    pub fn load<P: AsRef<Path>, Q: AsRef<Path>>(trust: &[P], identities: &[Q]) -> Result<Self> {
        let trust = if trust.is_empty() {
            None
        } else {
            Some(TrustSet::from_paths(trust)?)
        };
        Ok(Self::new(trust, Identities::from_files(identities)?))
    }

    pub fn trust(&self) -> Option<&TrustSet> {
        self.trust.as_ref()
    }

    /// Whether a snapshot must carry a signature by a trusted key.
    pub fn requires_signature(&self) -> bool {
        self.trust.is_some()
    }

    pub fn can_decrypt(&self) -> bool {
        !self.identities.is_empty()
    }

    /// Checks everything that can be checked before the snapshot is read: with a trust set,
    /// that `signature` (the `.minisig` beside it, `None` when there is none) is by a trusted
    /// key, that its trusted comment is intact, names the `manifest` stored beside the
    /// snapshot (its exact bytes) and the size the store reports (`stored_size`). `what`
    /// names the snapshot in errors.
    pub fn admit(
        &self,
        what: &str,
        signature: Option<&[u8]>,
        manifest: Option<&[u8]>,
        stored_size: Option<u64>,
    ) -> Result<Admitted> {
        let mut admitted = Admitted {
            what: what.to_string(),
            trust: self.trust.clone(),
            identities: self.identities.clone(),
            signature: None,
            signer: None,
            facts: None,
            expect_size: stored_size,
            manifest_authenticated: false,
            verified: Arc::new(Mutex::new(None)),
        };
        let Some(trust) = &self.trust else {
            return Ok(admitted);
        };
        let signature = signature.ok_or_else(|| TrustError::Unsigned {
            what: what.to_string(),
        })?;
        let v = trust.verifier(signature)?;
        let key_id = v.key_id();
        let fail = |reason: String| TrustError::FactsMismatch { key_id, reason };
        if let Some(f) = v.facts() {
            match (&f.manifest_digest, manifest) {
                (Some(want), Some(bytes)) => {
                    let got = manifest_digest(bytes);
                    if *want != got {
                        return Err(fail(format!(
                            "names manifest {want}, but the manifest beside {what} is {got}: \
                             snapshot and manifest do not belong together"
                        )));
                    }
                    admitted.manifest_authenticated = true;
                }
                (Some(want), None) => {
                    return Err(fail(format!(
                        "names manifest {want}, but there is no manifest beside {what}"
                    )));
                }
                (None, _) => {}
            }
            if let Some(size) = stored_size
                && size != f.size
            {
                return Err(fail(format!(
                    "names size {}, but {what} has {size} bytes: it was replaced, truncated \
                     or extended",
                    f.size
                )));
            }
            admitted.expect_size = Some(f.size);
        }
        admitted.signer = Some(key_id);
        admitted.facts = v.facts().cloned();
        admitted.signature = Some(signature.to_vec());
        Ok(admitted)
    }
}

/// A snapshot that passed [`OpenPolicy::admit`]: open its stream with [`Admitted::reader`]
/// (more than once if needed: reads after the first whole one are held to the bytes the
/// first verified).
pub struct Admitted {
    what: String,
    trust: Option<TrustSet>,
    identities: Arc<Identities>,
    signature: Option<Vec<u8>>,
    signer: Option<KeyId>,
    facts: Option<SignedFacts>,
    expect_size: Option<u64>,
    manifest_authenticated: bool,
    verified: Arc<Mutex<Option<Verified>>>,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("what", &self.what)
            .field("signer", &self.signer)
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

impl Admitted {
    /// The key id of the trusted key that signed the snapshot (`None` without a trust set).
    /// Known before the stream is read; the stream itself is vouched for only once a reader
    /// reached its end without error.
    pub fn signer(&self) -> Option<KeyId> {
        self.signer
    }

    /// The signed facts (stored SHA-256, size, manifest digest), if the signature has them.
    pub fn facts(&self) -> Option<&SignedFacts> {
        self.facts.as_ref()
    }

    /// Whether the manifest given to [`OpenPolicy::admit`] is covered by the signature.
    pub fn manifest_authenticated(&self) -> bool {
        self.manifest_authenticated
    }

    /// The verdict of the first whole read, once there was one.
    pub fn verified(&self) -> Option<Verified> {
        self.verified.lock().ok().and_then(|v| v.clone())
    }

    /// Wraps the stored stream: the result reads plaintext snapshot bytes. With a signature
    /// to check, the stream is verified before its last byte is handed on (an error takes
    /// its place); an age stream is decrypted (it is recognised by its header), each chunk
    /// authenticated before it is released, a truncation detected before the end.
    pub fn reader<R: Read>(&self, raw: R) -> Result<OpenReader<R>> {
        let check = match (&self.signature, self.verified()) {
            (None, _) => Check::None,
            (Some(_), Some(v)) => Check::Pinned {
                hasher: sha2::Sha256::new(),
                sha256: v.sha256,
            },
            (Some(sig), None) => {
                let trust = self.trust.as_ref().ok_or_else(|| {
                    TrustError::Crypto("internal: a signature without a trust set".to_string())
                })?;
                Check::Signature(Some(Box::new(trust.verifier(sig)?)))
            }
        };
        let expect_size = match &check {
            Check::Pinned { .. } => self.verified().map(|v| v.size),
            _ => self.expect_size,
        };
        let mut gate = Gate {
            inner: raw,
            what: self.what.clone(),
            check,
            expect_size,
            seen: 0,
            concluded: false,
            slot: self.verified.clone(),
        };
        let mut head = Vec::with_capacity(AGE_MAGIC.len());
        (&mut gate)
            .take(AGE_MAGIC.len() as u64)
            .read_to_end(&mut head)
            .map_err(|e| TrustError::io("reading the start of the snapshot", e))?;
        let encrypted = head == AGE_MAGIC;
        let stream = Prefixed {
            head,
            pos: 0,
            inner: gate,
        };
        let inner = if encrypted {
            if self.identities.is_empty() {
                return Err(TrustError::NeedIdentity {
                    what: self.what.clone(),
                });
            }
            Inner::Decrypt(decrypt_reader(stream, &self.identities)?)
        } else {
            Inner::Plain(stream)
        };
        Ok(OpenReader {
            inner,
            encrypted,
            signed: self.signature.is_some(),
            slot: self.verified.clone(),
            what: self.what.clone(),
        })
    }
}

enum Check {
    None,
    /// First read: the signature. `None` once concluded.
    Signature(Option<Box<StreamVerifier>>),
    /// Later reads: the SHA-256 the first read verified.
    Pinned {
        hasher: sha2::Sha256,
        sha256: [u8; 32],
    },
}

/// Checks the stored stream, concluding as its last expected byte arrives (or at its end
/// when the size is not known), before that byte is handed on.
struct Gate<R> {
    inner: R,
    what: String,
    check: Check,
    expect_size: Option<u64>,
    seen: u64,
    concluded: bool,
    slot: Arc<Mutex<Option<Verified>>>,
}

fn refuse(e: TrustError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<R: Read> Gate<R> {
    fn conclude(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.concluded, true) {
            return Ok(());
        }
        match &mut self.check {
            Check::None => Ok(()),
            Check::Signature(v) => {
                let Some(v) = v.take() else {
                    return Ok(());
                };
                let verified = v.finish().map_err(refuse)?;
                if let Ok(mut slot) = self.slot.lock() {
                    *slot = Some(verified);
                }
                Ok(())
            }
            Check::Pinned { hasher, sha256 } => {
                let got: [u8; 32] = std::mem::take(hasher).finalize().into();
                if got != *sha256 {
                    return Err(refuse(TrustError::Changed {
                        what: self.what.clone(),
                    }));
                }
                Ok(())
            }
        }
    }
}

impl<R: Read> Read for Gate<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some(size) = self.expect_size
                && self.seen < size
                && !matches!(self.check, Check::None)
            {
                return Err(refuse(TrustError::Truncated {
                    what: self.what.clone(),
                    at: self.seen,
                    size,
                }));
            }
            self.conclude()?;
            return Ok(0);
        }
        let total = self.seen + n as u64;
        if let Some(size) = self.expect_size
            && total > size
            && !matches!(self.check, Check::None)
        {
            return Err(refuse(TrustError::Extended {
                what: self.what.clone(),
                size,
            }));
        }
        match &mut self.check {
            Check::None => {}
            Check::Signature(Some(v)) => v.update(&buf[..n]),
            Check::Signature(None) => {}
            Check::Pinned { hasher, .. } => hasher.update(&buf[..n]),
        }
        self.seen = total;
        if Some(total) == self.expect_size {
            self.conclude()?;
        }
        Ok(n)
    }
}

/// The bytes already read to recognise the format, then the rest.
struct Prefixed<R> {
    head: Vec<u8>,
    pos: usize,
    inner: R,
}

impl<R: Read> Read for Prefixed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.head.len() {
            let n = (self.head.len() - self.pos).min(buf.len());
            buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

enum Inner<R: Read> {
    Plain(Prefixed<Gate<R>>),
    Decrypt(DecryptingReader<Prefixed<Gate<R>>>),
}

/// The plaintext snapshot stream of an admitted snapshot. Until [`OpenReader::finish`] (or
/// an end of stream without error) nothing read is vouched for: act on it only then, or
/// in a way that is undone on error (a restore publishes its maps at the end).
pub struct OpenReader<R: Read> {
    inner: Inner<R>,
    encrypted: bool,
    signed: bool,
    slot: Arc<Mutex<Option<Verified>>>,
    what: String,
}

impl<R: Read> fmt::Debug for OpenReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenReader")
            .field("what", &self.what)
            .field("encrypted", &self.encrypted)
            .field("signed", &self.signed)
            .finish_non_exhaustive()
    }
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Plain(r) => r.read(buf),
            Inner::Decrypt(r) => r.read(buf),
        }
    }
}

impl<R: Read> OpenReader<R> {
    /// Whether the stored stream is age-encrypted.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// Reads what is left and returns the verdict: `Some` with the signer when a signature
    /// was checked, `None` when the policy has no trust set.
    pub fn finish(mut self) -> Result<Option<Verified>> {
        io::copy(&mut self, &mut io::sink())
            .map_err(|e| TrustError::io("reading the rest of the snapshot", e))?;
        if !self.signed {
            return Ok(None);
        }
        let v = self.slot.lock().ok().and_then(|v| v.clone());
        v.map(Some).ok_or_else(|| {
            TrustError::Crypto(format!(
                "internal: {} was read to its end but its signature was not concluded",
                self.what
            ))
        })
    }
}
