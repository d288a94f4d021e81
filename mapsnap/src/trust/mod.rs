//! Signed and encrypted snapshots, in formats users already have tools for.
//!
//! - **Signatures** are detached files in the [minisign] format: Ed25519 over the BLAKE2b-512
//!   of the stream (minisign's prehashed `ED` mode, what `minisign -S` writes today), plus a
//!   second signature over a *trusted comment* that names the stream's SHA-256, its size and
//!   the manifest's digest. [`SigningWriter`] hashes the bytes as they are written, so signing
//!   needs no second pass; [`TrustSet`] checks a stream against several public keys (key
//!   rotation) as it is read ([`VerifyingReader`]) or in one call ([`TrustSet::verify_stream`]).
//!   `minisign -V` verifies what mapsnap signs, and mapsnap verifies what `minisign -S` signs.
//! - **Encryption** is an [age] stream ([`encrypt_writer`], [`decrypt_reader`]) to X25519
//!   (`age1...`) or `ssh-ed25519` recipients: `age -d` decrypts what mapsnap encrypts, and
//!   mapsnap decrypts what `age -r`/`age -R` encrypt. Both directions stream in 64 KiB chunks.
//!
//! Composition at dump: snapshot writer -> [`EncryptingWriter`] -> [`SigningWriter`] -> file,
//! so the signature covers the ciphertext and can be checked without any identity.
//!
//! [minisign]: https://jedisct1.github.io/minisign/
//! [age]: https://age-encryption.org/v1

mod crypt;
mod hasher;
mod keys;
mod sign;
mod verify;

#[cfg(test)]
mod tests;

pub use crypt::{
    DecryptingReader, EncryptingWriter, Identities, Recipient, decrypt_reader, encrypt_writer,
};
pub use keys::{KeyId, KeyPair, PublicKey, SecretKey, keygen};
pub use sign::{SIGNATURE_SUFFIX, Signed, SignedFacts, SigningWriter};
pub use verify::{
    Expected, StreamVerifier, TrustSet, Verified, VerifyingReader, read_signature, signature_path,
};

use std::path::PathBuf;

/// Why a key could not be used, a stream was refused, or encryption failed. Every message
/// names the file or key id involved.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: not a minisign {kind}: {reason}")]
    BadKey {
        what: String,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "{what}: the secret key is password-protected; give its password (or make a \
         password-less key with `minisign -G -W` or `mapsnap::trust::keygen(None)`)"
    )]
    KeyNeedsPassword { what: String },
    #[error("{what}: wrong password for this secret key")]
    WrongPassword { what: String },
    #[error("trust set has two different keys with key id {key_id} ({first} and {second})")]
    DuplicateKeyId {
        key_id: KeyId,
        first: String,
        second: String,
    },
    #[error("{what}: no public keys found (expected minisign .pub files)")]
    EmptyTrustSet { what: String },
    #[error("{what} is not signed (no minisign signature), and a trust set is configured")]
    Unsigned { what: String },
    #[error("malformed minisign signature: {reason}")]
    BadSignature { reason: String },
    #[error(
        "signature uses the legacy non-prehashed minisign mode (Ed); only prehashed (ED) \
         signatures are accepted, as `minisign -S` writes them"
    )]
    LegacySignature,
    #[error("signed by key {key_id}, which is not in the trust set (trusted: {trusted})")]
    UntrustedKey { key_id: KeyId, trusted: String },
    #[error(
        "signature by key {key_id} does not match the data: the stream was altered or \
         belongs to another signature"
    )]
    DataMismatch { key_id: KeyId },
    #[error(
        "trusted comment of the signature by key {key_id} was altered (its signature does \
         not verify)"
    )]
    CommentMismatch { key_id: KeyId },
    #[error("signature by key {key_id} is valid, but its trusted comment {reason}")]
    FactsMismatch { key_id: KeyId, reason: String },
    #[error(
        "invalid manifest digest {digest:?}: it must be 1 to 256 printable ASCII characters \
         without spaces"
    )]
    BadManifestDigest { digest: String },
    #[error("invalid age recipient {given:?}: {reason}")]
    BadRecipient { given: String, reason: String },
    #[error("{what}: no age recipients given")]
    NoRecipients { what: String },
    #[error("{what}: {reason}")]
    BadIdentity { what: String, reason: String },
    #[error("no identity given to decrypt an age-encrypted stream")]
    NoIdentities,
    #[error("not an age-encrypted stream: {reason}")]
    NotAge { reason: String },
    #[error(
        "no identity matches the stream's recipients (tried {tried}): it was encrypted to \
         other keys"
    )]
    NoMatchingIdentity { tried: String },
    #[error("age header refused: {reason}")]
    BadAgeHeader { reason: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Crypto(String),
}

pub type Result<T> = std::result::Result<T, TrustError>;

impl TrustError {
    fn io(what: &'static str, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }
}

/// Key, identity and signature files are small; a larger one is a mistake (or an attack),
/// not something to read into memory.
const MAX_SMALL_FILE: u64 = 1 << 20;

/// Reads a key, identity or signature file, with its path in the error.
fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let err = |source| TrustError::ReadFile {
        path: path.to_path_buf(),
        source,
    };
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SMALL_FILE + 1).read_to_end(&mut buf))
        .map_err(err)?;
    if buf.len() as u64 > MAX_SMALL_FILE {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_SMALL_FILE} bytes: not a key, identity or signature file"),
        )));
    }
    Ok(buf)
}
