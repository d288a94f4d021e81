//! Signing a stream as it is written, into a minisign signature file.

use std::fmt;
use std::io::{self, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer as _;

use super::hasher::{StreamHasher, Want};
use super::keys::{KeyId, SecretKey};
use super::{Result, TrustError};

/// File name suffix of a detached signature (`snapshot.msnap` -> `snapshot.msnap.minisig`),
/// the name `minisign -S` uses.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// minisign's prehashed signature algorithm: Ed25519 over BLAKE2b-512 of the data.
pub(crate) const SIGALG_PREHASHED: [u8; 2] = *b"ED";
pub(crate) const SIGALG_LEGACY: [u8; 2] = *b"Ed";
pub(crate) const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
pub(crate) const TRUSTED_PREFIX: &str = "trusted comment: ";
/// First word of the trusted comments mapsnap writes (see [`SignedFacts`]).
const FACTS_TAG: &str = "mapsnap-snapshot";

/// What a mapsnap trusted comment states about the signed stream:
/// `mapsnap-snapshot sha256:<hex> size:<bytes> manifest:<digest|none> timestamp:<unix secs>`.
/// The comment is covered by its own signature, so these facts are authenticated too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedFacts {
    /// SHA-256 of the signed stream (of the ciphertext when the stream is encrypted).
    pub sha256: [u8; 32],
    pub size: u64,
    /// The manifest's digest as the caller named it (e.g. `sha256:<hex>`), if any.
    pub manifest_digest: Option<String>,
    /// Seconds since the epoch at signing time, if stated.
    pub timestamp: Option<u64>,
}

impl SignedFacts {
    pub(crate) fn to_comment(&self) -> String {
        let mut s = format!(
            "{FACTS_TAG} sha256:{} size:{} manifest:{}",
            hex::encode(self.sha256),
            self.size,
            self.manifest_digest.as_deref().unwrap_or("none")
        );
        if let Some(t) = self.timestamp {
            s.push_str(&format!(" timestamp:{t}"));
        }
        s
    }

    /// Parses a trusted comment. `Ok(None)` when it is not a mapsnap comment (e.g. the
    /// `timestamp:... file:...` comment `minisign -S` writes by default).
    pub(crate) fn parse(comment: &str) -> std::result::Result<Option<Self>, String> {
        let mut words = comment.split(' ');
        if words.next() != Some(FACTS_TAG) {
            return Ok(None);
        }
        let (mut sha256, mut size, mut manifest, mut timestamp) = (None, None, None, None);
        for w in words {
            let (k, v) = w
                .split_once(':')
                .ok_or_else(|| format!("has a malformed field {w:?}"))?;
            match k {
                "sha256" => {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(v, &mut d)
                        .map_err(|_| format!("has a malformed sha256 {v:?}"))?;
                    sha256 = Some(d);
                }
                "size" => {
                    size = Some(
                        v.parse()
                            .map_err(|_| format!("has a malformed size {v:?}"))?,
                    )
                }
                "manifest" => manifest = Some((v != "none").then(|| v.to_string())),
                "timestamp" => {
                    timestamp = Some(
                        v.parse()
                            .map_err(|_| format!("has a malformed timestamp {v:?}"))?,
                    )
                }
                // Fields a later version may add are signed like the rest; ignore them.
                _ => {}
            }
        }
        Ok(Some(SignedFacts {
            sha256: sha256.ok_or("names no sha256")?,
            size: size.ok_or("names no size")?,
            manifest_digest: manifest.flatten(),
            timestamp,
        }))
    }
}

/// The result of [`SigningWriter::finish`].
#[derive(Clone, Debug)]
pub struct Signed {
    /// The whole `.minisig` file, ready to store beside the snapshot.
    pub signature: Vec<u8>,
    pub key_id: KeyId,
    pub trusted_comment: String,
    pub facts: SignedFacts,
}

/// Passes a stream through to `inner` and signs exactly the bytes `inner` accepted, in the
/// same pass. [`SigningWriter::finish`] returns the minisign signature file.
pub struct SigningWriter<W: Write> {
    inner: W,
    key: SecretKey,
    hasher: StreamHasher,
}

impl<W: Write> fmt::Debug for SigningWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningWriter")
            .field("key_id", &self.key.key_id)
            .field("bytes", &self.hasher.size())
            .finish_non_exhaustive()
    }
}

impl<W: Write> SigningWriter<W> {
    pub fn new(inner: W, key: &SecretKey) -> Self {
        Self {
            inner,
            key: key.clone(),
            hasher: StreamHasher::new(Want::BOTH),
        }
    }

    /// Bytes signed so far.
    pub fn bytes_written(&self) -> u64 {
        self.hasher.size()
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Flushes `inner` and signs the stream. `manifest_digest` (e.g. `sha256:<hex>` of the
    /// manifest stored beside the snapshot) goes into the trusted comment; it must be
    /// printable ASCII without spaces.
    pub fn finish(mut self, manifest_digest: Option<&str>) -> Result<(W, Signed)> {
        if let Some(d) = manifest_digest
            // minisign bounds the length of trusted comments it reads; a digest is short.
            && (d.is_empty()
                || d.len() > 256
                || d == "none"
                || !d.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(TrustError::BadManifestDigest {
                digest: d.to_string(),
            });
        }
        self.inner
            .flush()
            .map_err(|e| TrustError::io("flushing the signed stream", e))?;
        let (prehash, sha256, size) = self.hasher.finish()?.both()?;
        let facts = SignedFacts {
            sha256,
            size,
            manifest_digest: manifest_digest.map(str::to_string),
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
        };
        let trusted_comment = facts.to_comment();
        let signature = sign_prehashed(&self.key, &prehash, &trusted_comment);
        Ok((
            self.inner,
            Signed {
                signature,
                key_id: self.key.key_id,
                trusted_comment,
                facts,
            },
        ))
    }
}

impl<W: Write> Write for SigningWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A minisign signature file: the data signature over the prehash, then the global signature
/// over (data signature || trusted comment), as minisign 0.8+ writes and checks them.
pub(crate) fn sign_prehashed(
    key: &SecretKey,
    prehash: &[u8; 64],
    trusted_comment: &str,
) -> Vec<u8> {
    let sig = key.key.sign(prehash).to_bytes();
    let mut sig_line = Vec::with_capacity(74);
    sig_line.extend_from_slice(&SIGALG_PREHASHED);
    sig_line.extend_from_slice(&key.key_id.0);
    sig_line.extend_from_slice(&sig);
    let mut global = Vec::with_capacity(64 + trusted_comment.len());
    global.extend_from_slice(&sig);
    global.extend_from_slice(trusted_comment.as_bytes());
    let global_sig = key.key.sign(&global).to_bytes();
    format!(
        "{UNTRUSTED_PREFIX}signature from mapsnap, key {}\n{}\n{TRUSTED_PREFIX}{trusted_comment}\n{}\n",
        key.key_id,
        B64.encode(sig_line),
        B64.encode(global_sig)
    )
    .into_bytes()
}
