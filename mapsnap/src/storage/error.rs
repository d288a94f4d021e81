//! Storage errors: one line each, always naming the location, sorted into kinds the CLI maps
//! to exit codes.

use std::fmt;
#[cfg(feature = "remote")]
use std::time::Duration;

/// What went wrong, coarsely: enough for an exit code and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The location is malformed or names an unsupported scheme.
    BadLocation,
    /// The configuration file or environment is invalid.
    Config,
    /// No object (or file, or bucket) at the location.
    NotFound,
    /// The object exists and `--overwrite` was not given.
    AlreadyExists,
    /// The server refused the credentials or the permission.
    Denied,
    /// The endpoint could not be reached (after retries).
    Unreachable,
    /// The overall timeout expired.
    Timeout,
    /// The bytes read do not match what the manifest recorded, or the object changed while
    /// it was read.
    Corrupt,
    /// Anything else the store or the file system reported.
    Other,
}

impl ErrorKind {
    fn label(self) -> &'static str {
        match self {
            ErrorKind::BadLocation => "bad location",
            ErrorKind::Config => "configuration",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Denied => "access denied",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Other => "error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A storage failure: `<location>: <what happened and what to do>`, on one line.
///
/// Cloneable and self-contained (the underlying error is kept as text) so it can travel
/// inside an `io::Error` through the snapshot codec and be recovered intact by the CLI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct StorageError {
    pub kind: ErrorKind,
    /// The location as the user wrote it (`s3://bucket/key`, a path, ...).
    pub location: String,
    pub message: String,
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    pub fn new(kind: ErrorKind, location: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            location: location.into(),
            message: one_line(&message.into()),
        }
    }

    /// The timeout error for `what` after `limit`.
    #[cfg(feature = "remote")]
    pub(crate) fn timeout(location: &str, what: &str, limit: Duration) -> Self {
        Self::new(
            ErrorKind::Timeout,
            location,
            format!(
                "{what}: gave up after the overall timeout of {} (raise it with --timeout, \
                 MAPSNAP_STORAGE_TIMEOUT or `timeout` in the config file)",
                super::config::format_duration(limit)
            ),
        )
    }

    /// Wraps this error for `std::io::Read`/`Write` callers; [`Self::from_io`] gets it back.
    pub fn into_io(self) -> std::io::Error {
        let kind = match self.kind {
            ErrorKind::NotFound => std::io::ErrorKind::NotFound,
            ErrorKind::AlreadyExists => std::io::ErrorKind::AlreadyExists,
            ErrorKind::Denied => std::io::ErrorKind::PermissionDenied,
            ErrorKind::Timeout => std::io::ErrorKind::TimedOut,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, self)
    }

    /// The storage error carried by an `io::Error` made by [`Self::into_io`], if any.
    pub fn from_io(e: &std::io::Error) -> Option<&StorageError> {
        e.get_ref()?.downcast_ref::<StorageError>()
    }

    /// Finds a storage error anywhere in an error's source chain, including inside
    /// `io::Error`s (which hide their payload from `source()`).
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a StorageError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(s) = err.downcast_ref::<StorageError>() {
                return Some(s);
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && let Some(s) = Self::from_io(io)
            {
                return Some(s);
            }
            cur = err.source();
        }
        None
    }

    #[cfg(feature = "remote")]
    /// Classifies an `object_store` error from operation `what` (e.g. "cannot read").
    pub(crate) fn from_store(location: &str, what: &str, e: &object_store::Error) -> Self {
        use object_store::Error as E;
        let detail = detail_of(e);
        let (kind, message) = match e {
            E::NotFound { .. } => {
                if detail.contains("NoSuchBucket") {
                    (
                        ErrorKind::NotFound,
                        format!("{what}: the bucket does not exist ({detail})"),
                    )
                } else {
                    (
                        ErrorKind::NotFound,
                        format!("{what}: no such object ({detail})"),
                    )
                }
            }
            E::AlreadyExists { .. } => (
                ErrorKind::AlreadyExists,
                "already exists: pass --overwrite to replace it".to_string(),
            ),
            E::Precondition { .. } | E::NotModified { .. } => (
                ErrorKind::Corrupt,
                format!(
                    "{what}: the object changed while it was being read (its ETag no longer \
                     matches); run the command again"
                ),
            ),
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
                ErrorKind::Denied,
                format!(
                    "{what}: access denied ({detail}); check the credentials (environment, \
                     config file or provider chain) and the bucket's permissions"
                ),
            ),
            _ if is_connect_error(e) => (
                ErrorKind::Unreachable,
                match endpoint_of(e) {
                    Some(ep) => {
                        format!("{what}: cannot reach the storage endpoint {ep} ({detail})")
                    }
                    None => format!("{what}: cannot reach the storage endpoint ({detail})"),
                },
            ),
            _ if detail.contains("InvalidAccessKeyId")
                || detail.contains("SignatureDoesNotMatch")
                || detail.contains("AccessDenied") =>
            {
                (
                    ErrorKind::Denied,
                    format!(
                        "{what}: access denied ({detail}); check the credentials (environment, \
                         config file or provider chain) and the bucket's permissions"
                    ),
                )
            }
            E::Generic { .. } if detail.contains("NoSuchBucket") => (
                ErrorKind::NotFound,
                format!("{what}: the bucket does not exist ({detail})"),
            ),
            _ => (ErrorKind::Other, format!("{what}: {detail}")),
        };
        Self::new(kind, location, message)
    }
}

#[cfg(feature = "remote")]
/// Whether the chain holds an HTTP connect failure (refused, unresolvable, unroutable).
fn is_connect_error(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<HttpError>()
            && h.kind() == HttpErrorKind::Connect
        {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(feature = "remote")]
/// A short description of a store error: S3-style `<Code>`/`<Message>` from an XML body when
/// there is one, the HTTP status, the innermost cause; never the whole XML.
fn detail_of(e: &object_store::Error) -> String {
    let mut texts = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        texts.push(err.to_string());
        cur = err.source();
    }
    let all = texts.join(" | ");
    if let Some(code) = xml_tag(&all, "Code") {
        let msg = xml_tag(&all, "Message").unwrap_or_default();
        let status = status_of(&all)
            .map(|s| format!("HTTP {s} "))
            .unwrap_or_default();
        return if msg.is_empty() {
            format!("{status}{code}")
        } else {
            format!("{status}{code}: {msg}")
        };
    }
    // Innermost cause first (most specific), then the retry summary if present.
    let innermost = texts.last().cloned().unwrap_or_default();
    let retries = texts
        .iter()
        .find_map(|t| t.find(", after ").map(|i| t[i + 2..].to_string()))
        .and_then(|t| t.split(',').next().map(|s| s.trim().to_string()));
    let status = status_of(&all).map(|s| format!("HTTP {s}: "));
    let mut out = format!("{}{}", status.unwrap_or_default(), innermost);
    if let Some(r) = retries {
        out.push_str(&format!(" ({r})"));
    }
    out
}

#[cfg(feature = "remote")]
/// `scheme://host:port` of the request that failed, from the retry error's text.
fn endpoint_of(e: &object_store::Error) -> Option<String> {
    let text = e.to_string();
    let start = text.find("http://").or_else(|| text.find("https://"))?;
    let rest = &text[start..];
    let after_scheme = rest.find("://")? + 3;
    let end = rest[after_scheme..]
        .find(['/', ' '])
        .map_or(rest.len(), |i| i + after_scheme);
    Some(rest[..end].to_string())
}

#[cfg(feature = "remote")]
fn xml_tag(s: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = s.find(&open)? + open.len();
    let end = s[start..].find(&close)? + start;
    Some(s[start..end].trim().to_string())
}

#[cfg(feature = "remote")]
fn status_of(s: &str) -> Option<String> {
    let i = s.find("status code: ")? + "status code: ".len();
    let rest = &s[i..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    (end > 0).then(|| rest[..end].to_string())
}

/// Collapses whitespace runs (newlines included) so every message is one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_and_name_the_location() {
        let e = StorageError::new(ErrorKind::Other, "s3://b/k", "line one\nline two\n");
        assert_eq!(e.to_string(), "s3://b/k: line one line two");
    }

    #[test]
    fn survives_a_trip_through_io_error() {
        let e = StorageError::new(ErrorKind::Denied, "gs://b/k", "no");
        let io = e.clone().into_io();
        assert_eq!(StorageError::from_io(&io), Some(&e));
        let wrapped = crate::format::FormatError::Io(io);
        assert_eq!(StorageError::find(&wrapped), Some(&e));
    }

    #[cfg(feature = "remote")]
    #[test]
    fn xml_codes_are_extracted() {
        let s = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\
                 <Error><Code>InvalidAccessKeyId</Code><Message>The key does not exist</Message></Error>";
        assert_eq!(xml_tag(s, "Code").as_deref(), Some("InvalidAccessKeyId"));
        assert_eq!(status_of(s).as_deref(), Some("403"));
    }
}
