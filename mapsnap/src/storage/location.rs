//! Snapshot locations: a path, `-`, `file:///path`, `s3://bucket/key`, `gs://bucket/key`,
//! `az://container/key`.

use std::fmt;
use std::path::PathBuf;

use super::error::{ErrorKind, Result, StorageError};

/// Suffix of the manifest stored beside each snapshot.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";

/// An object store provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    S3,
    Gcs,
    Azure,
}

impl Provider {
    pub fn scheme(self) -> &'static str {
        match self {
            Provider::S3 => "s3",
            Provider::Gcs => "gs",
            Provider::Azure => "az",
        }
    }
}

/// Where a snapshot is read from or written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `-`: standard input or output.
    Stdio,
    /// A local file (a plain path or `file:///...`).
    Local(PathBuf),
    /// An object in a bucket (S3), bucket (GCS) or container (Azure).
    Remote {
        provider: Provider,
        bucket: String,
        key: String,
    },
}

impl Location {
    /// Parses a location. URLs carry only provider, bucket and key: user info, query
    /// strings and fragments are refused, because endpoints and credentials come from the
    /// environment and the config file, never from a location that may have come from a
    /// snapshot, an annotation or another user.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |msg: &str| StorageError::new(ErrorKind::BadLocation, s, msg.to_string());
        if s.is_empty() {
            return Err(bad("empty location"));
        }
        if s == "-" {
            return Ok(Location::Stdio);
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(s)));
        };
        let scheme = scheme.to_ascii_lowercase();
        let url = url::Url::parse(s).map_err(|e| bad(&format!("not a valid URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials in the location are refused: use the environment or the config \
                 file (/etc/mapsnap/config.toml)",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "query strings and fragments are refused: endpoint and options come from the \
                 environment or the config file",
            ));
        }
        let provider = match scheme.as_str() {
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad(
                        "file:// locations must be local: file:///absolute/path",
                    ));
                }
                let path = url
                    .to_file_path()
                    .map_err(|()| bad("file:// location is not an absolute path"))?;
                return Ok(Location::Local(path));
            }
            "s3" | "s3a" => Provider::S3,
            "gs" => Provider::Gcs,
            "az" | "azure" => Provider::Azure,
            other => {
                return Err(bad(&format!(
                    "unsupported scheme {other}://; use a path, file://, s3://, gs:// or az://"
                )));
            }
        };
        if url.port().is_some() {
            return Err(bad(
                "a port in the location is refused: set the endpoint in the environment or \
                 the config file",
            ));
        }
        let bucket = url.host_str().unwrap_or_default().to_string();
        if bucket.is_empty() {
            return Err(bad("the location names no bucket (scheme://bucket/key)"));
        }
        let raw_key = url.path().trim_start_matches('/');
        let key = percent_decode(raw_key).ok_or_else(|| bad("the key is not valid UTF-8"))?;
        if key.is_empty() || key.ends_with('/') {
            return Err(bad(
                "the location names no object key (scheme://bucket/key)",
            ));
        }
        #[cfg(feature = "remote")]
        object_store::path::Path::parse(&key)
            .map_err(|e| bad(&format!("invalid object key: {e}")))?;
        Ok(Location::Remote {
            provider,
            bucket,
            key,
        })
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Location::Remote { .. })
    }

    /// Where the manifest of a snapshot at this location lives (none for stdio).
    pub fn manifest(&self) -> Option<Location> {
        self.sibling(MANIFEST_SUFFIX)
    }

    /// Where the detached minisign signature beside the snapshot lives (`None` for `-`).
    pub fn signature(&self) -> Option<Location> {
        self.sibling(crate::trust::SIGNATURE_SUFFIX)
    }

    /// This location with `suffix` appended to its file name or key.
    fn sibling(&self, suffix: &str) -> Option<Location> {
        match self {
            Location::Stdio => None,
            Location::Local(p) => {
                let mut s = p.clone().into_os_string();
                s.push(suffix);
                Some(Location::Local(PathBuf::from(s)))
            }
            Location::Remote {
                provider,
                bucket,
                key,
            } => Some(Location::Remote {
                provider: *provider,
                bucket: bucket.clone(),
                key: format!("{key}{suffix}"),
            }),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Stdio => f.write_str("-"),
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Remote {
                provider,
                bucket,
                key,
            } => write!(f, "{}://{bucket}/{key}", provider.scheme()),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(Location::parse("-").ok(), Some(Location::Stdio));
        assert_eq!(
            Location::parse("snap.mapsnap").ok(),
            Some(Location::Local("snap.mapsnap".into()))
        );
        assert_eq!(
            Location::parse("file:///tmp/a%20b.snap").ok(),
            Some(Location::Local("/tmp/a b.snap".into()))
        );
        assert_eq!(
            Location::parse("s3://bucket/dir/app.mapsnap").ok(),
            Some(Location::Remote {
                provider: Provider::S3,
                bucket: "bucket".into(),
                key: "dir/app.mapsnap".into()
            })
        );
        let gs = Location::parse("gs://b/k").expect("gs");
        assert_eq!(gs.to_string(), "gs://b/k");
        let az = Location::parse("az://container/k").expect("az");
        assert_eq!(az.to_string(), "az://container/k");
        assert_eq!(
            az.manifest().map(|m| m.to_string()).as_deref(),
            Some("az://container/k.manifest.json")
        );
        assert_eq!(
            Location::parse("/x/s.snap")
                .ok()
                .and_then(|l| l.manifest())
                .map(|m| m.to_string())
                .as_deref(),
            Some("/x/s.snap.manifest.json")
        );
    }

    #[test]
    fn refuses_what_a_location_must_not_carry() {
        for bad in [
            "s3://AKIA:secret@bucket/key",
            "s3://bucket/key?endpoint=http://evil",
            "s3://bucket:9000/key",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "ftp://host/file",
            "file://otherhost/x",
            "",
        ] {
            let e = Location::parse(bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::BadLocation, "{bad}: {e}");
        }
    }
}
