//! age encryption and decryption of snapshot streams.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use super::{Result, TrustError, read_file};

/// Someone a stream is encrypted to: an age X25519 recipient (`age1...`, as `age-keygen`
/// prints it) or an SSH public key (`ssh-ed25519 AAAA... [comment]`; `ssh-rsa` too).
#[derive(Clone)]
pub struct Recipient {
    kind: RecipientKind,
    /// As given, for messages.
    text: String,
}

#[derive(Clone)]
enum RecipientKind {
    X25519(age::x25519::Recipient),
    Ssh(age::ssh::Recipient),
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient({})", self.text)
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Recipient {
    pub fn parse(s: &str) -> Result<Self> {
        let text = s.trim();
        let bad = |reason: String| TrustError::BadRecipient {
            given: text.to_string(),
            reason,
        };
        let kind = if text.starts_with("age1") {
            RecipientKind::X25519(
                age::x25519::Recipient::from_str(text).map_err(|e| bad(e.to_string()))?,
            )
        } else if text.starts_with("ssh-") {
            RecipientKind::Ssh(
                age::ssh::Recipient::from_str(text).map_err(|e| bad(format!("{e:?}")))?,
            )
        } else {
            return Err(bad(
                "expected an age X25519 recipient (age1...) or an SSH public key (ssh-ed25519 ...)"
                    .to_string(),
            ));
        };
        Ok(Recipient {
            kind,
            text: text.to_string(),
        })
    }

    /// Reads a recipients file as `age -R` does: one recipient per line, `#` comments and
    /// blank lines skipped. An SSH `.pub` file is such a file.
    pub fn from_file(path: &Path) -> Result<Vec<Self>> {
        let what = path.display().to_string();
        let text = String::from_utf8(read_file(path)?).map_err(|_| TrustError::BadIdentity {
            what: what.clone(),
            reason: "recipients file is not UTF-8 text".to_string(),
        })?;
        let recipients = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Self::parse)
            .collect::<Result<Vec<_>>>()?;
        if recipients.is_empty() {
            return Err(TrustError::NoRecipients { what });
        }
        Ok(recipients)
    }

    /// Recipients as given on a command line or in a config: each an `age1...` recipient, an
    /// `ssh-...` public key, or `@FILE`, a recipients file (see [`Recipient::from_file`]).
    pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for a in args {
            let a = a.as_ref();
            match a.strip_prefix('@') {
                Some(path) => out.extend(Self::from_file(Path::new(path))?),
                None => out.push(Self::parse(a)?),
            }
        }
        Ok(out)
    }

    fn as_age(&self) -> &dyn age::Recipient {
        match &self.kind {
            RecipientKind::X25519(r) => r,
            RecipientKind::Ssh(r) => r,
        }
    }
}

/// Encrypts what is written to it into an age stream on `inner`, in 64 KiB chunks.
/// [`EncryptingWriter::finish`] must be called: without it the stream lacks its final chunk,
/// and every reader refuses it as truncated.
pub struct EncryptingWriter<W: Write> {
    inner: age::stream::StreamWriter<W>,
}

impl<W: Write> fmt::Debug for EncryptingWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptingWriter").finish_non_exhaustive()
    }
}

impl<W: Write> EncryptingWriter<W> {
    /// Writes the final chunk and returns `inner` (not flushed beyond what `inner` does).
    pub fn finish(self) -> Result<W> {
        self.inner
            .finish()
            .map_err(|e| TrustError::io("writing the last age chunk", e))
    }
}

impl<W: Write> Write for EncryptingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Starts an age stream to `recipients` on `inner` (the header is written now).
pub fn encrypt_writer<W: Write>(inner: W, recipients: &[Recipient]) -> Result<EncryptingWriter<W>> {
    if recipients.is_empty() {
        return Err(TrustError::NoRecipients {
            what: "encrypt".to_string(),
        });
    }
    let enc = age::Encryptor::with_recipients(recipients.iter().map(Recipient::as_age))
        .map_err(|e| TrustError::Crypto(format!("age: {e}")))?;
    let inner = enc
        .wrap_output(inner)
        .map_err(|e| TrustError::io("writing the age header", e))?;
    Ok(EncryptingWriter { inner })
}

/// Private keys to decrypt with: age identity files (`age-keygen` output: `AGE-SECRET-KEY-1...`
/// lines, `#` comments) and unencrypted OpenSSH private keys (ed25519, rsa).
#[derive(Default)]
pub struct Identities {
    keys: Vec<Box<dyn age::Identity + Send + Sync>>,
    /// Where each group of keys came from, for messages (never the keys themselves).
    sources: Vec<String>,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

struct ShowUnsupported<'a>(&'a age::ssh::UnsupportedKey, &'a str);

impl fmt::Display for ShowUnsupported<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display(f, Some(self.1))
    }
}

impl Identities {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut ids = Self::new();
        for p in paths {
            ids.add_file(p.as_ref())?;
        }
        Ok(ids)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds the keys in `path`: an SSH private key file or an age identity file.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let what = path.display().to_string();
        let data = read_file(path)?;
        self.add_bytes(&data, &what)
    }

    /// Adds keys from an in-memory identity file (e.g. a mounted Secret read elsewhere);
    /// `what` names it in messages.
    pub fn add_bytes(&mut self, data: &[u8], what: &str) -> Result<()> {
        let bad = |reason: String| TrustError::BadIdentity {
            what: what.to_string(),
            reason,
        };
        let text = std::str::from_utf8(data).map_err(|_| bad("not UTF-8 text".to_string()))?;
        if text.contains("-----BEGIN ") && text.contains("PRIVATE KEY-----") {
            let id = age::ssh::Identity::from_buffer(text.as_bytes(), Some(what.to_string()))
                .map_err(|e| bad(format!("SSH private key: {e}")))?;
            match id {
                age::ssh::Identity::Unencrypted(_) => self.keys.push(Box::new(id)),
                age::ssh::Identity::Encrypted(_) => {
                    return Err(bad("the SSH private key is passphrase-protected; mapsnap reads keys \
                         without prompting: use an unprotected copy (ssh-keygen -p -N '') kept in a \
                         Secret, or an age identity"
                        .to_string()));
                }
                age::ssh::Identity::Unsupported(k) => {
                    return Err(bad(ShowUnsupported(&k, what).to_string()));
                }
            }
            self.sources.push(format!("SSH key {what}"));
        } else {
            let file = age::IdentityFile::from_buffer(text.as_bytes())
                .map_err(|e| bad(format!("age identity file: {e}")))?;
            let keys = file
                .into_identities()
                .map_err(|e| bad(format!("age identity file: {e}")))?;
            if keys.is_empty() {
                return Err(bad(
                    "no AGE-SECRET-KEY-1 line in this identity file".to_string()
                ));
            }
            self.sources
                .push(format!("{} age key(s) from {what}", keys.len()));
            self.keys.extend(keys);
        }
        Ok(())
    }
}

/// Decrypts an age stream as it is read. Plaintext is released chunk by chunk after each
/// chunk's authentication; a truncated stream is only detected at its end, so a caller must
/// read to the end (or call [`DecryptingReader::finish`]) before acting on what it read.
pub struct DecryptingReader<R: Read> {
    inner: age::stream::StreamReader<R>,
    plaintext: u64,
}

impl<R: Read> fmt::Debug for DecryptingReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptingReader")
            .field("plaintext", &self.plaintext)
            .finish_non_exhaustive()
    }
}

impl<R: Read> DecryptingReader<R> {
    /// Plaintext bytes returned so far.
    pub fn plaintext_read(&self) -> u64 {
        self.plaintext
    }

    /// Reads to the end of the stream, so its last chunk (and so its length) is
    /// authenticated. Returns how many plaintext bytes were left unread by the caller.
    pub fn finish(mut self) -> Result<u64> {
        io::copy(&mut self, &mut io::sink())
            .map_err(|e| TrustError::io("reading the rest of the age stream", e))
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.plaintext += n as u64;
                Ok(n)
            }
            // A refusal from below (the signature check) is reported as it is.
            Err(e) if e.get_ref().is_some_and(|x| x.is::<TrustError>()) => Err(e),
            Err(e) => {
                let at = self.plaintext;
                Err(match e.kind() {
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => io::Error::new(
                        e.kind(),
                        TrustError::CiphertextRefused {
                            at,
                            truncated: e.kind() == io::ErrorKind::UnexpectedEof,
                            reason: e.to_string(),
                        },
                    ),
                    _ => e,
                })
            }
        }
    }
}

/// Reads the age header from `inner` and unwraps the file key with one of `identities`.
/// Refuses passphrase-encrypted (scrypt) streams: those need a human at a prompt.
pub fn decrypt_reader<R: Read>(inner: R, identities: &Identities) -> Result<DecryptingReader<R>> {
    if identities.is_empty() {
        return Err(TrustError::NoIdentities);
    }
    let dec = age::Decryptor::new(inner).map_err(|e| match e {
        age::DecryptError::InvalidHeader | age::DecryptError::UnknownFormat => TrustError::NotAge {
            reason: e.to_string(),
        },
        age::DecryptError::Io(io) => TrustError::NotAge {
            reason: format!("reading the age header: {io}"),
        },
        other => TrustError::BadAgeHeader {
            reason: other.to_string(),
        },
    })?;
    if dec.is_scrypt() {
        return Err(TrustError::BadAgeHeader {
            reason: "the stream is passphrase-encrypted (age -p); mapsnap decrypts only streams \
                     encrypted to recipients"
                .to_string(),
        });
    }
    let inner = dec
        .decrypt(
            identities
                .keys
                .iter()
                .map(|k| k.as_ref() as &dyn age::Identity),
        )
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => TrustError::NoMatchingIdentity {
                tried: identities.sources.join(", "),
            },
            age::DecryptError::InvalidMac => TrustError::BadAgeHeader {
                reason: "header MAC does not verify: the header was altered".to_string(),
            },
            other => TrustError::BadAgeHeader {
                reason: other.to_string(),
            },
        })?;
    Ok(DecryptingReader {
        inner,
        plaintext: 0,
    })
}
