//! minisign key files: generation, loading (password-less or scrypt-protected), key ids.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::{Result, TrustError, read_file};

/// minisign's signature algorithm tag in keys ("Ed"); prehashed signatures say "ED".
pub(crate) const SIGALG_ED: [u8; 2] = *b"Ed";
const KDF_NONE: [u8; 2] = [0, 0];
const KDF_SCRYPT: [u8; 2] = *b"Sc";
const CHK_BLAKE2B: [u8; 2] = *b"B2";
/// sig_alg 2, kdf_alg 2, chk_alg 2, salt 32, opslimit 8, memlimit 8, key id 8, sk 64, chk 32.
const SECRET_KEY_BYTES: usize = 158;
const SK_KEYNUM: std::ops::Range<usize> = 54..62;
const SK_SECRET: std::ops::Range<usize> = 62..126;
const SK_CHK: std::ops::Range<usize> = 126..158;
const COMMENT_PREFIX: &str = "untrusted comment: ";

/// A minisign key id: 8 random bytes chosen at key generation, shown (like minisign does) as
/// 16 upper-case hex digits of their little-endian value, e.g. `951329EC6EB4C06D`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = TrustError;
    /// Parses the 16-hex-digit form minisign prints.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || TrustError::BadKey {
            what: s.to_string(),
            kind: "key id",
            reason: "expected 16 hex digits".to_string(),
        };
        if s.len() != 16 {
            return Err(bad());
        }
        let v = u64::from_str_radix(s, 16).map_err(|_| bad())?;
        Ok(KeyId(v.to_le_bytes()))
    }
}

/// A minisign public key (Ed25519) with its key id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub(crate) key_id: KeyId,
    pub(crate) key: ed25519_dalek::VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id)
    }
}

impl PublicKey {
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Parses a public key file as `minisign -G` writes it (an untrusted comment line, then
    /// the base64 key), or the bare base64 key as `minisign -P` takes it.
    pub fn parse(text: &str, what: &str) -> Result<Self> {
        let bad = |reason: String| TrustError::BadKey {
            what: what.to_string(),
            kind: "public key",
            reason,
        };
        let text = text.trim_start_matches('\u{feff}');
        let pk = if text.starts_with(COMMENT_PREFIX) {
            minisign::PublicKey::from_box(
                minisign::PublicKeyBox::from_string(text).map_err(|e| bad(e.to_string()))?,
            )
        } else {
            minisign::PublicKey::from_base64(text.trim())
        }
        .map_err(|e| bad(e.to_string()))?;
        let raw = pk.to_bytes();
        if raw.len() != 42 || raw[..2] != SIGALG_ED {
            return Err(bad("not an Ed25519 minisign key".to_string()));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&raw[2..10]);
        let mut pk_bytes = [0u8; 32];
        pk_bytes.copy_from_slice(&raw[10..42]);
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk_bytes)
            .map_err(|e| bad(format!("invalid Ed25519 point: {e}")))?;
        Ok(PublicKey {
            key_id: KeyId(key_id),
            key,
        })
    }

    /// Reads a `.pub` file (see [`PublicKey::parse`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = String::from_utf8(read_file(path)?).map_err(|_| TrustError::BadKey {
            what: path.display().to_string(),
            kind: "public key",
            reason: "not UTF-8 text".to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The file contents `minisign -G` writes for this key (comment line + base64 line).
    pub fn to_box_string(&self) -> String {
        let mut raw = Vec::with_capacity(42);
        raw.extend_from_slice(&SIGALG_ED);
        raw.extend_from_slice(&self.key_id.0);
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "{COMMENT_PREFIX}minisign public key {}\n{}\n",
            self.key_id,
            B64.encode(raw)
        )
    }
}

/// A minisign secret key, decrypted and ready to sign.
#[derive(Clone)]
pub struct SecretKey {
    pub(crate) key_id: KeyId,
    pub(crate) key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.key_id)
    }
}

impl SecretKey {
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// Parses a secret key file as `minisign -G` writes it. A password-less key (`minisign -G
    /// -W`, or [`keygen`] with `None`) needs no password; a password-protected one needs it
    /// (never prompted for: automation passes it in, or uses a password-less key).
    pub fn parse(text: &str, password: Option<&str>, what: &str) -> Result<Self> {
        let bad = |reason: &str| TrustError::BadKey {
            what: what.to_string(),
            kind: "secret key",
            reason: reason.to_string(),
        };
        let mut lines = text.trim_start_matches('\u{feff}').lines();
        match lines.next() {
            Some(l) if l.starts_with(COMMENT_PREFIX) => {}
            _ => return Err(bad("first line must be an untrusted comment")),
        }
        let b64 = lines.next().ok_or_else(|| bad("missing key line"))?;
        let raw = B64
            .decode(b64.trim())
            .map_err(|_| bad("key line is not base64"))?;
        if raw.len() != SECRET_KEY_BYTES || raw[..2] != SIGALG_ED || raw[4..6] != CHK_BLAKE2B {
            return Err(bad("not an Ed25519 minisign secret key"));
        }
        let kdf = [raw[2], raw[3]];
        let decrypted;
        let raw = if kdf == KDF_NONE {
            raw
        } else if kdf == KDF_SCRYPT {
            let password = password.ok_or_else(|| TrustError::KeyNeedsPassword {
                what: what.to_string(),
            })?;
            let boxed =
                minisign::SecretKeyBox::from_string(text).map_err(|e| bad(&e.to_string()))?;
            // The crate derives the scrypt key, removes it and checks the checksum: a wrong
            // password shows up as a checksum mismatch.
            decrypted = minisign::SecretKey::from_box(boxed, Some(password.to_string()))
                .map_err(|e| match e.kind() {
                    minisign::ErrorKind::Verify => TrustError::WrongPassword {
                        what: what.to_string(),
                    },
                    _ => bad(&e.to_string()),
                })?
                .to_bytes();
            decrypted
        } else {
            return Err(bad("unknown key encryption algorithm"));
        };
        // minisign -W (0.11) leaves the checksum zero; keys from this crate or rsign carry
        // BLAKE2b-256(sig_alg || key id || sk). Check it when present; the seed/public half
        // consistency check below catches damage either way.
        let chk = &raw[SK_CHK];
        if chk.iter().any(|&b| b != 0) {
            let mut h = blake2b_simd::Params::new().hash_length(32).to_state();
            h.update(&raw[..2]);
            h.update(&raw[SK_KEYNUM]);
            h.update(&raw[SK_SECRET]);
            if h.finalize().as_bytes() != chk {
                return Err(bad("checksum mismatch (damaged key)"));
            }
        }
        // The key id is encrypted along with the key: read it only now.
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&raw[SK_KEYNUM]);
        let key_id = KeyId(key_id);
        let mut pair = [0u8; 64];
        pair.copy_from_slice(&raw[SK_SECRET]);
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&pair)
            .map_err(|_| bad("secret and public halves do not match (damaged key)"));
        pair.fill(0);
        Ok(SecretKey { key_id, key: key? })
    }

    /// Reads a secret key file (see [`SecretKey::parse`]).
    pub fn from_file(path: &Path, password: Option<&str>) -> Result<Self> {
        let what = path.display().to_string();
        let text = String::from_utf8(read_file(path)?).map_err(|_| TrustError::BadKey {
            what: what.clone(),
            kind: "secret key",
            reason: "not UTF-8 text".to_string(),
        })?;
        Self::parse(&text, password, &what)
    }
}

/// A new key pair with the file contents `minisign -G` would write for it.
#[derive(Debug)]
pub struct KeyPair {
    pub public: PublicKey,
    pub secret: SecretKey,
    /// The `.pub` file contents.
    pub public_file: String,
    /// The secret key file contents (scrypt-protected when a password was given).
    pub secret_file: String,
}

impl KeyPair {
    /// Writes both files; the secret key is created with mode 0600 and never overwrites.
    pub fn write_files(&self, public_path: &Path, secret_path: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrustError::ReadFile { path, source }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(secret_path)
            .map_err(err(secret_path))?;
        f.write_all(self.secret_file.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(err(secret_path))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(public_path)
            .and_then(|mut f| f.write_all(self.public_file.as_bytes()))
            .map_err(err(public_path))
    }
}

/// Generates a minisign key pair: scrypt-protected when `password` is given (minisign's own
/// parameters), password-less otherwise (for automation, like `minisign -G -W`). Both load in
/// `minisign -S` and here.
pub fn keygen(password: Option<&str>) -> Result<KeyPair> {
    let crypto = |e: minisign::PError| TrustError::Crypto(format!("key generation: {e}"));
    let (pair, comment) = match password {
        Some(p) => (
            minisign::KeyPair::generate_encrypted_keypair(Some(p.to_string())).map_err(crypto)?,
            "minisign encrypted secret key",
        ),
        None => (
            minisign::KeyPair::generate_unencrypted_keypair().map_err(crypto)?,
            "minisign secret key (no password)",
        ),
    };
    let public_file = pair.pk.to_box().map_err(crypto)?.into_string();
    let secret_file = pair.sk.to_box(Some(comment)).map_err(crypto)?.into_string();
    let public = PublicKey::parse(&public_file, "generated public key")?;
    let secret = SecretKey::parse(&secret_file, password, "generated secret key")?;
    if secret.public_key() != public {
        return Err(TrustError::Crypto(
            "key generation: secret and public keys differ".to_string(),
        ));
    }
    Ok(KeyPair {
        public,
        secret,
        public_file,
        secret_file,
    })
}
