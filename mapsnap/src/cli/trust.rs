//! Trust flags of the commands (`dump --sign/--encrypt-to`, `--trust/--identity` of the
//! commands that read) and `mapsnap keygen`. Keys and passwords come from files or the
//! environment, never from arguments (those show in `ps`).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mapsnap::storage::{Location, Storage};
use mapsnap::trust::{self, Admitted, OpenPolicy, SealPolicy};

/// Environment variable holding the signing key's password (`dump --sign`) or the new key's
/// password (`keygen`), when no password file is given.
pub const PASSWORD_ENV: &str = "MAPSNAP_KEY_PASSWORD";

/// Signing and encryption at `dump`.
#[derive(Debug, clap::Args, Default)]
pub struct SealArgs {
    /// Sign with this minisign secret key: a detached signature `<output>.minisig` is stored
    /// beside the snapshot (verifiable with `minisign -V`).
    #[arg(long, value_name = "KEY_FILE")]
    pub sign: Option<PathBuf>,
    /// File holding the signing key's password (first line); else the MAPSNAP_KEY_PASSWORD
    /// environment variable; password-less keys need neither.
    #[arg(long, value_name = "FILE", requires = "sign")]
    pub password_file: Option<PathBuf>,
    /// Encrypt (age) to this recipient: `age1...`, `ssh-ed25519 ...`, or `@FILE` of
    /// recipients, one per line (repeatable). Decrypts with `age -d -i`.
    #[arg(long, value_name = "RECIPIENT")]
    pub encrypt_to: Vec<String>,
}

impl SealArgs {
    pub fn policy(&self) -> anyhow::Result<SealPolicy> {
        let password = match &self.sign {
            Some(_) => password(self.password_file.as_deref())?,
            None => None,
        };
        Ok(SealPolicy::load(
            self.sign.as_deref(),
            password.as_deref(),
            &self.encrypt_to,
        )?)
    }
}

/// Reads a password from `file` (its first line), else from [`PASSWORD_ENV`].
fn password(file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let mut text = String::new();
        std::fs::File::open(f)
            .and_then(|h| h.take(4096).read_to_string(&mut text))
            .with_context(|| format!("{}: cannot read the password file", f.display()))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            bail!("{}: the password file is empty", f.display());
        }
        return Ok(Some(line));
    }
    Ok(std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()))
}

/// Signature checking and decryption for the commands that read snapshots.
#[derive(Debug, clap::Args, Default)]
pub struct OpenArgs {
    /// Accept only snapshots signed by this minisign public key, or by any `*.pub` key in this
    /// directory (repeatable; several keys allow rotation). Unsigned, otherwise signed or
    /// altered snapshots are refused before any map is touched.
    #[arg(long, value_name = "PUBKEY_OR_DIR")]
    pub trust: Vec<PathBuf>,
    /// Decrypt age-encrypted snapshots with this age identity file or unencrypted OpenSSH
    /// private key (repeatable).
    #[arg(long, value_name = "FILE")]
    pub identity: Vec<PathBuf>,
}

impl OpenArgs {
    pub fn policy(&self) -> anyhow::Result<OpenPolicy> {
        Ok(OpenPolicy::load(&self.trust, &self.identity)?)
    }
}

/// Admits the snapshot at `st` under `policy`: reads the signature beside it and checks it
/// against the manifest's bytes and the stored size before anything else is read.
pub fn admit(
    st: &Storage,
    policy: &OpenPolicy,
    manifest_bytes: Option<&[u8]>,
) -> anyhow::Result<Admitted> {
    let (signature, size) = if *st.location() == Location::Stdio || !policy.requires_signature() {
        (None, None)
    } else {
        (st.read_signature()?, st.head()?.map(|i| i.size))
    };
    Ok(policy.admit(st.name(), signature.as_deref(), manifest_bytes, size)?)
}

/// `mapsnap keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Write the public key to PREFIX.pub and the secret key to PREFIX.key (mode 0600);
    /// existing files are never replaced.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
    /// Protect the secret key with the password in this file (first line); else with
    /// MAPSNAP_KEY_PASSWORD if set; else the key has no password (for automation: keep it
    /// in a Secret).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn keygen(a: &KeygenArgs) -> anyhow::Result<()> {
    let password = password(a.password_file.as_deref())?;
    let pair = trust::keygen(password.as_deref())?;
    let with = |ext: &str| {
        let mut s = a.out.clone().into_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    let (public, secret) = (with(".pub"), with(".key"));
    pair.write_files(&public, &secret)?;
    let key_id = pair.public.key_id().to_string();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "key_id": key_id,
                "public_key": public,
                "secret_key": secret,
                "password": password.is_some(),
            }))?
        );
    } else {
        eprintln!(
            "key {key_id}: public {} , secret {} ({})",
            public.display(),
            secret.display(),
            if password.is_some() {
                "password-protected"
            } else {
                "no password"
            }
        );
    }
    Ok(())
}
