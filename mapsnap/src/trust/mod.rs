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
//! Composition at dump: snapshot writer -> age encryption -> signing hash -> file, so the
//! signature covers the stored bytes (the ciphertext) and can be checked without any identity.
//!
//! # Using it: [`SealPolicy`] and [`OpenPolicy`]
//!
//! Writing (the CLI's `dump --sign KEY --encrypt-to R`, the hook, the CRIU plugin): wrap the
//! destination, dump into it, then sign once the manifest's bytes are known. Store the
//! signature (`<snapshot>.minisig`) after the snapshot and before the manifest.
//!
//! ```no_run
//! # fn demo(maps: &[mapsnap::discover::Found], info: &mapsnap::model::SnapshotInfo,
//! #         st: &mapsnap::storage::Storage) -> Result<(), Box<dyn std::error::Error>> {
//! use mapsnap::storage::{Manifest, ManifestSource};
//! use mapsnap::trust::SealPolicy;
//! let policy = SealPolicy::load(
//!     Some(std::path::Path::new("/etc/mapsnap/sign.key")), // minisign secret key
//!     None,                                                // its password, if any
//!     &["age1...", "@/etc/mapsnap/recipients.txt"],
//! )?;
//! let w = policy.seal(st.writer(false)?)?;
//! let (w, report) = mapsnap::dump::dump(maps, w, info, &Default::default(),
//!                                       &mapsnap::progress::NoProgress)?;
//! let (w, sealed) = w.finish(&report.digest)?;
//! w.commit()?;
//! let mut manifest = Manifest::new(st.name(), info, &report, ManifestSource::default());
//! sealed.apply(&mut manifest); // the manifest describes the stored (encrypted) bytes
//! let json = manifest.to_json();
//! if let Some(signed) = sealed.sign(Some(&json))? {
//!     st.write_signature(&signed.signature)?;
//! }
//! st.write_manifest_bytes(&json)?;
//! # Ok(()) }
//! ```
//!
//! Reading (`verify`, `inspect`, `diff`, `restore`, the hook and plugin at restore): admit
//! the snapshot (signature, manifest bytes and stored size are checked before any byte of
//! the snapshot is read: unsigned, untrusted key, swapped manifest, wrong size are refused
//! here, naming the key id), then read through [`Admitted::reader`]. The reader checks the
//! signature before the last byte is handed on and decrypts age streams (recognised by their
//! header). A second read (verify, then apply) is held to the bytes the first one verified.
//!
//! ```no_run
//! # fn demo(st: &mapsnap::storage::Storage) -> Result<(), Box<dyn std::error::Error>> {
//! use mapsnap::trust::OpenPolicy;
//! // A directory of *.pub files is a trust set: add the new key, switch signers, drop the old.
//! let policy = OpenPolicy::load(&["/etc/mapsnap/trusted"], &["/etc/mapsnap/age.key"])?;
//! let manifest = st.read_manifest_bytes()?;
//! let size = st.head()?.map(|i| i.size);
//! let admitted = policy.admit(st.name(), st.read_signature()?.as_deref(),
//!                             manifest.as_deref(), size)?;
//! println!("signed by {:?}", admitted.signer()); // for status and logs
//! let mut r = admitted.reader(st.reader(None)?)?;
//! let summary = mapsnap::format::verify(&mut r)?; // or restore(r, ...)
//! let verified = r.finish()?; // Some(Verified { key_id, .. }) with a trust set
//! # let _ = (summary, verified); Ok(()) }
//! ```
//!
//! With a trust set every failure is a [`TrustError`] (also inside the I/O errors a decoder
//! returns: [`TrustError::find`]); [`TrustError::is_refusal`] tells a refused snapshot from
//! an unusable key of the caller's.
//!
//! [minisign]: https://jedisct1.github.io/minisign/
//! [age]: https://age-encryption.org/v1

mod crypt;
mod hasher;
mod keys;
mod policy;
mod sign;
mod verify;

#[cfg(test)]
mod tests;

pub use crypt::{
    DecryptingReader, EncryptingWriter, Identities, Recipient, decrypt_reader, encrypt_writer,
};
pub use keys::{KeyId, KeyPair, PublicKey, SecretKey, keygen};
pub use policy::{
    Admitted, OpenPolicy, OpenReader, SealPolicy, SealWriter, Sealed, manifest_digest,
};
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
    #[error("{}", if *truncated {
        format!("age stream truncated after {at} plaintext bytes ({reason})")
    } else {
        format!(
            "age stream altered, damaged or cut short: the chunk after {at} plaintext bytes \
             failed authentication ({reason})"
        )
    })]
    CiphertextRefused {
        at: u64,
        truncated: bool,
        reason: String,
    },
    #[error("{what} is age-encrypted: give an identity to decrypt it (--identity FILE)")]
    NeedIdentity { what: String },
    #[error(
        "{what} changed since it was verified: a second read returned other bytes (it was \
         replaced while being read); nothing was applied from it"
    )]
    Changed { what: String },
    #[error("{what} is truncated: it ended after {at} bytes, the signature covers {size}")]
    Truncated { what: String, at: u64, size: u64 },
    #[error("{what} is longer than the {size} bytes its signature covers: it was altered")]
    Extended { what: String, size: u64 },
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
    /// Finds a trust error anywhere in an error's source chain, including inside
    /// `io::Error`s (which hide their payload from `source()`): readers report refusals as
    /// I/O errors to the snapshot decoder.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TrustError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(t) = err.downcast_ref::<TrustError>() {
                // An I/O wrapper around a refusal: the refusal is what to report.
                if let TrustError::Io { source, .. } = t
                    && let Some(inner) = source.get_ref().and_then(|x| x.downcast_ref())
                {
                    return Some(inner);
                }
                return Some(t);
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && let Some(inner) = io.get_ref()
            {
                cur = Some(inner);
                continue;
            }
            cur = err.source();
        }
        None
    }

    /// Whether this is a refusal of the snapshot (unsigned, untrusted, altered, undecryptable)
    /// rather than a problem with the caller's keys or files.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Unsigned { .. }
                | Self::BadSignature { .. }
                | Self::LegacySignature
                | Self::UntrustedKey { .. }
                | Self::DataMismatch { .. }
                | Self::CommentMismatch { .. }
                | Self::FactsMismatch { .. }
                | Self::NotAge { .. }
                | Self::NoMatchingIdentity { .. }
                | Self::BadAgeHeader { .. }
                | Self::Changed { .. }
                | Self::CiphertextRefused { .. }
                | Self::Truncated { .. }
                | Self::Extended { .. }
        )
    }

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
