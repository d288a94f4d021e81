//! Checking streams against a set of trusted minisign public keys.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::hasher::{StreamHasher, Want};
use super::keys::{KeyId, PublicKey};
use super::sign::{SIGALG_LEGACY, SIGALG_PREHASHED, SignedFacts, TRUSTED_PREFIX, UNTRUSTED_PREFIX};
use super::{Result, TrustError};

/// The public keys a reader accepts signatures from. Several at once, so keys can be rotated:
/// add the new key to every reader, switch writers to it, then drop the old one.
#[derive(Clone, Default)]
pub struct TrustSet {
    /// (key, where it came from)
    keys: Vec<(PublicKey, String)>,
}

impl fmt::Debug for TrustSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.keys
                    .iter()
                    .map(|(k, from)| format!("{} ({from})", k.key_id)),
            )
            .finish()
    }
}

impl TrustSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key; `source` names it in messages (e.g. its file). The same key twice is
    /// kept once; two different keys with one key id are refused (a signature names only the
    /// key id, so that would be ambiguous).
    pub fn add(&mut self, key: PublicKey, source: impl Into<String>) -> Result<()> {
        let source = source.into();
        if let Some((have, first)) = self.keys.iter().find(|(k, _)| k.key_id == key.key_id) {
            if *have == key {
                return Ok(());
            }
            return Err(TrustError::DuplicateKeyId {
                key_id: key.key_id,
                first: first.clone(),
                second: source,
            });
        }
        self.keys.push((key, source));
        Ok(())
    }

    /// Loads public key files, and from each directory among `paths` every `*.pub` file in
    /// it (not recursive). Refuses an empty result: a trust set that trusts nothing is a
    /// misconfiguration, not "no checking".
    pub fn from_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut set = Self::new();
        for p in paths {
            let p = p.as_ref();
            let is_dir = std::fs::metadata(p)
                .map_err(|source| TrustError::ReadFile {
                    path: p.to_path_buf(),
                    source,
                })?
                .is_dir();
            if is_dir {
                let mut files = Vec::new();
                let entries = std::fs::read_dir(p).map_err(|source| TrustError::ReadFile {
                    path: p.to_path_buf(),
                    source,
                })?;
                for e in entries {
                    let e = e.map_err(|source| TrustError::ReadFile {
                        path: p.to_path_buf(),
                        source,
                    })?;
                    let path = e.path();
                    if path.extension().is_some_and(|x| x == "pub") && path.is_file() {
                        files.push(path);
                    }
                }
                // Sorted, so errors and key order do not depend on directory order.
                files.sort();
                for f in files {
                    set.add(PublicKey::from_file(&f)?, f.display().to_string())?;
                }
            } else {
                set.add(PublicKey::from_file(p)?, p.display().to_string())?;
            }
        }
        if set.is_empty() {
            return Err(TrustError::EmptyTrustSet {
                what: paths
                    .iter()
                    .map(|p| p.as_ref().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|(k, _)| k.key_id).collect()
    }

    pub fn get(&self, key_id: KeyId) -> Option<&PublicKey> {
        self.keys
            .iter()
            .find(|(k, _)| k.key_id == key_id)
            .map(|(k, _)| k)
    }

    /// Checks everything that does not depend on the data (format, key in the set, trusted
    /// comment signature) and returns a verifier to feed the stream to. So a stream signed
    /// by an unknown key is refused before any of it is read.
    pub fn verifier(&self, signature: &[u8]) -> Result<StreamVerifier> {
        let sig = SignatureFile::parse(signature)?;
        let key = self
            .get(sig.key_id)
            .ok_or_else(|| TrustError::UntrustedKey {
                key_id: sig.key_id,
                trusted: self
                    .key_ids()
                    .iter()
                    .map(KeyId::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
            .clone();
        let mut global = Vec::with_capacity(64 + sig.trusted_comment.len());
        global.extend_from_slice(&sig.sig.to_bytes());
        global.extend_from_slice(sig.trusted_comment.as_bytes());
        key.key
            .verify_strict(&global, &sig.global_sig)
            .map_err(|_| TrustError::CommentMismatch { key_id: key.key_id })?;
        let facts = SignedFacts::parse(&sig.trusted_comment).map_err(|reason| {
            TrustError::FactsMismatch {
                key_id: key.key_id,
                reason,
            }
        })?;
        Ok(StreamVerifier {
            key,
            sig: sig.sig,
            trusted_comment: sig.trusted_comment,
            facts,
            hasher: StreamHasher::new(Want::BOTH),
        })
    }

    /// Wraps `inner` so the stream is checked as it is read; see [`VerifyingReader::finish`].
    pub fn verifying_reader<R: Read>(
        &self,
        inner: R,
        signature: &[u8],
    ) -> Result<VerifyingReader<R>> {
        Ok(VerifyingReader {
            inner,
            verifier: self.verifier(signature)?,
        })
    }

    /// Reads the whole stream and checks it against `signature` (the `.minisig` file's
    /// bytes). Memory stays bounded (64 KiB buffer).
    pub fn verify_stream<R: Read>(&self, reader: R, signature: &[u8]) -> Result<Verified> {
        let mut r = self.verifying_reader(reader, signature)?;
        io::copy(&mut r, &mut io::sink())
            .map_err(|e| TrustError::io("reading the signed stream", e))?;
        Ok(r.finish()?.1)
    }
}

/// The detached signature's path for a snapshot file: `<snapshot>.minisig`.
pub fn signature_path(snapshot: &Path) -> std::path::PathBuf {
    let mut s = snapshot.as_os_str().to_owned();
    s.push(super::SIGNATURE_SUFFIX);
    s.into()
}

/// Reads the detached signature of `snapshot` (see [`signature_path`]). A missing signature
/// file is [`TrustError::Unsigned`], so a caller with a trust set refuses the snapshot.
pub fn read_signature(snapshot: &Path) -> Result<Vec<u8>> {
    let path = signature_path(snapshot);
    match super::read_file(&path) {
        Err(TrustError::ReadFile { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Err(TrustError::Unsigned {
                what: snapshot.display().to_string(),
            })
        }
        other => other,
    }
}

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The trusted key that made the signature.
    pub key_id: KeyId,
    /// The signed trusted comment, verbatim.
    pub trusted_comment: String,
    /// The comment's facts when it is a mapsnap comment (checked against the stream: its
    /// SHA-256 and size match). `None` for other comments, e.g. `minisign -S`'s default.
    pub facts: Option<SignedFacts>,
    /// SHA-256 and size of the stream as read.
    pub sha256: [u8; 32],
    pub size: u64,
}

/// What a caller knows independently (e.g. from the manifest) and wants the signature to
/// vouch for. Unset fields are not checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub sha256: Option<[u8; 32]>,
    pub size: Option<u64>,
    pub manifest_digest: Option<String>,
}

impl Verified {
    /// Checks the signed facts against `expected`. A signature without mapsnap facts (a
    /// plain `minisign -S` comment) vouches for none, so any expectation fails.
    pub fn check(&self, expected: &Expected) -> Result<()> {
        let fail = |reason: String| TrustError::FactsMismatch {
            key_id: self.key_id,
            reason,
        };
        let nothing = Expected::default();
        if *expected == nothing {
            return Ok(());
        }
        let facts = self.facts.as_ref().ok_or_else(|| {
            fail(format!(
                "{:?} names no snapshot digest, size or manifest",
                self.trusted_comment
            ))
        })?;
        if let Some(want) = expected.sha256
            && want != facts.sha256
        {
            return Err(fail(format!(
                "names sha256 {}, expected {}",
                hex::encode(facts.sha256),
                hex::encode(want)
            )));
        }
        if let Some(want) = expected.size
            && want != facts.size
        {
            return Err(fail(format!("names size {}, expected {want}", facts.size)));
        }
        if let Some(want) = &expected.manifest_digest
            && Some(want) != facts.manifest_digest.as_ref()
        {
            return Err(fail(format!(
                "names manifest {}, expected {want}",
                facts.manifest_digest.as_deref().unwrap_or("none")
            )));
        }
        Ok(())
    }
}

/// A verification in progress: feed it the stream with [`StreamVerifier::update`], then
/// [`StreamVerifier::finish`].
pub struct StreamVerifier {
    key: PublicKey,
    sig: ed25519_dalek::Signature,
    trusted_comment: String,
    facts: Option<SignedFacts>,
    hasher: StreamHasher,
}

impl fmt::Debug for StreamVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamVerifier")
            .field("key_id", &self.key.key_id)
            .field("trusted_comment", &self.trusted_comment)
            .finish_non_exhaustive()
    }
}

impl StreamVerifier {
    /// The key id the signature names (already known to be trusted).
    pub fn key_id(&self) -> KeyId {
        self.key.key_id
    }

    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// The facts the (already verified) trusted comment states, before the data is read.
    pub fn facts(&self) -> Option<&SignedFacts> {
        self.facts.as_ref()
    }

    pub fn update(&mut self, buf: &[u8]) {
        self.hasher.update(buf);
    }

    pub fn finish(self) -> Result<Verified> {
        let key_id = self.key.key_id;
        let (prehash, sha256, size) = self.hasher.finish()?.both()?;
        self.key
            .key
            .verify_strict(&prehash, &self.sig)
            .map_err(|_| TrustError::DataMismatch { key_id })?;
        if let Some(f) = &self.facts {
            // Cannot fail after a valid signature unless the signer lied in its comment;
            // checked anyway so the facts a caller reads are the stream's.
            if f.sha256 != sha256 || f.size != size {
                return Err(TrustError::FactsMismatch {
                    key_id,
                    reason: format!(
                        "names sha256 {} size {}, the stream has sha256 {} size {size}",
                        hex::encode(f.sha256),
                        f.size,
                        hex::encode(sha256)
                    ),
                });
            }
        }
        Ok(Verified {
            key_id,
            trusted_comment: self.trusted_comment,
            facts: self.facts,
            sha256,
            size,
        })
    }
}

/// Passes a stream through while verifying it. The verdict comes from
/// [`VerifyingReader::finish`], which reads any rest of the stream first: until then nothing
/// read is authenticated, so a caller must not make its effects visible before `finish`.
pub struct VerifyingReader<R: Read> {
    inner: R,
    verifier: StreamVerifier,
}

impl<R: Read> fmt::Debug for VerifyingReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingReader")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

impl<R: Read> VerifyingReader<R> {
    pub fn verifier(&self) -> &StreamVerifier {
        &self.verifier
    }

    /// Reads what is left of the stream (the signature covers all of it), then verifies.
    /// Returns the inner reader, at its end, and the verdict.
    pub fn finish(mut self) -> Result<(R, Verified)> {
        io::copy(&mut self, &mut io::sink())
            .map_err(|e| TrustError::io("reading the rest of the signed stream", e))?;
        Ok((self.inner, self.verifier.finish()?))
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.verifier.update(&buf[..n]);
        Ok(n)
    }
}

/// A parsed `.minisig` file.
struct SignatureFile {
    key_id: KeyId,
    sig: ed25519_dalek::Signature,
    trusted_comment: String,
    global_sig: ed25519_dalek::Signature,
}

impl SignatureFile {
    fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: &str| TrustError::BadSignature {
            reason: reason.to_string(),
        };
        if bytes.len() > 64 * 1024 {
            return Err(bad("larger than 64 KiB"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let mut lines = text.lines();
        let mut next = |what: &str| {
            lines
                .next()
                .map(|l| l.trim_end_matches('\r'))
                .ok_or_else(|| bad(&format!("missing {what} line")))
        };
        if !next("untrusted comment")?.starts_with(UNTRUSTED_PREFIX) {
            return Err(bad("first line must start with \"untrusted comment: \""));
        }
        let sig_line = B64
            .decode(next("signature")?.trim())
            .map_err(|_| bad("signature line is not base64"))?;
        let comment_line = next("trusted comment")?;
        let trusted_comment = comment_line
            .strip_prefix(TRUSTED_PREFIX)
            .ok_or_else(|| bad("third line must start with \"trusted comment: \""))?
            // minisign trims the comment before checking (its fgets keeps no newline).
            .trim()
            .to_string();
        let global = B64
            .decode(next("trusted comment signature")?.trim())
            .map_err(|_| bad("trusted comment signature line is not base64"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(bad("unexpected text after the fourth line"));
        }
        if sig_line.len() != 74 {
            return Err(bad("signature line has the wrong length"));
        }
        let alg = [sig_line[0], sig_line[1]];
        if alg == SIGALG_LEGACY {
            return Err(TrustError::LegacySignature);
        }
        if alg != SIGALG_PREHASHED {
            return Err(bad("unknown signature algorithm"));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&sig_line[2..10]);
        let sig = ed25519_dalek::Signature::from_slice(&sig_line[10..74])
            .map_err(|_| bad("malformed Ed25519 signature"))?;
        let global_sig = ed25519_dalek::Signature::from_slice(&global)
            .map_err(|_| bad("malformed trusted comment signature"))?;
        Ok(SignatureFile {
            key_id: KeyId(key_id),
            sig,
            trusted_comment,
            global_sig,
        })
    }
}
