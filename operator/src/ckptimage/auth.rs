//! Registry credentials from a `kubernetes.io/dockerconfigjson` Secret (the same format as
//! `~/.docker/config.json` and Podman's `auth.json`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use super::{ImageError, RegistryAuth};

/// A dockerconfigjson larger than this is refused before parsing (a Secret is at most 1 MiB).
pub const MAX_DOCKER_CONFIG: usize = 1 << 20;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The host part of an `auths` key: keys may carry a scheme and a path
/// (`https://index.docker.io/v1/`, `http://host:5000/v2/`).
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// Docker Hub is stored under `index.docker.io` whatever the reference says.
fn canonical_host(host: &str) -> &str {
    match host {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io",
        h => h,
    }
}

impl RegistryAuth {
    /// Credentials for `registry_host` (`host[:port]`) from the contents of a
    /// `kubernetes.io/dockerconfigjson` Secret (its `.dockerconfigjson` key).
    pub fn from_docker_config_json(json: &[u8], registry_host: &str) -> Result<Self, ImageError> {
        if json.len() > MAX_DOCKER_CONFIG {
            return Err(ImageError::Auth(format!(
                "the docker config JSON is {} bytes, more than the {MAX_DOCKER_CONFIG} allowed: \
                 pass the Secret's .dockerconfigjson value, not something else",
                json.len()
            )));
        }
        let cfg: DockerConfig = serde_json::from_slice(json).map_err(|e| {
            ImageError::Auth(format!(
                "the docker config JSON does not parse ({e}): expected \
                 {{\"auths\":{{\"{registry_host}\":{{\"auth\":\"base64(user:password)\"}}}}}}"
            ))
        })?;
        let want = canonical_host(key_host(registry_host));
        let Some((key, entry)) = cfg
            .auths
            .iter()
            .find(|(k, _)| canonical_host(key_host(k)) == want)
        else {
            let have: Vec<&str> = cfg.auths.keys().map(String::as_str).collect();
            return Err(ImageError::Auth(format!(
                "the docker config JSON has no credentials for {registry_host} (it has: {}): \
                 create the Secret with `kubectl create secret docker-registry --docker-server={registry_host} ...`",
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        };
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic {
                username: u.clone(),
                password: p.clone(),
            });
        }
        if let Some(a) = &entry.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| {
                    ImageError::Auth(format!(
                        "auths.\"{key}\".auth is not base64 ({e}): it must be base64(user:password)"
                    ))
                })?;
            let text = String::from_utf8(raw).map_err(|_| {
                ImageError::Auth(format!(
                    "auths.\"{key}\".auth does not decode to UTF-8 text"
                ))
            })?;
            let Some((u, p)) = text.split_once(':') else {
                return Err(ImageError::Auth(format!(
                    "auths.\"{key}\".auth decodes to no `user:password` pair"
                )));
            };
            return Ok(RegistryAuth::Basic {
                username: u.to_string(),
                password: p.to_string(),
            });
        }
        if entry.identitytoken.is_some() {
            return Err(ImageError::Auth(format!(
                "auths.\"{key}\" holds only an identity token (OAuth refresh token), which is not \
                 supported: give a username and password (or a robot/service-account token as password)"
            )));
        }
        Err(ImageError::Auth(format!(
            "auths.\"{key}\" has neither `auth` nor `username`/`password`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> RegistryAuth {
        RegistryAuth::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn auth_field_and_username_password_both_work() {
        // base64("robot$ci:s3cr:et") — the password keeps its own colon.
        let b64 = base64::engine::general_purpose::STANDARD.encode("robot$ci:s3cr:et");
        let json = format!(r#"{{"auths":{{"https://reg.example:5000/v2/":{{"auth":"{b64}"}}}}}}"#);
        assert_eq!(
            RegistryAuth::from_docker_config_json(json.as_bytes(), "reg.example:5000")
                .expect("found"),
            basic("robot$ci", "s3cr:et")
        );
        let json = br#"{"auths":{"reg.example":{"username":"u","password":"p","auth":"eA=="}}}"#;
        assert_eq!(
            RegistryAuth::from_docker_config_json(json, "reg.example").expect("found"),
            basic("u", "p")
        );
    }

    #[test]
    fn docker_hub_keys_match_docker_io() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("a:b");
        let json = format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}}}}}}"#);
        assert_eq!(
            RegistryAuth::from_docker_config_json(json.as_bytes(), "docker.io").expect("found"),
            basic("a", "b")
        );
    }

    #[test]
    fn missing_host_names_what_is_there() {
        let json = br#"{"auths":{"other.example":{"auth":"YTpi"}}}"#;
        let e =
            RegistryAuth::from_docker_config_json(json, "reg.example:5000").expect_err("no entry");
        let msg = e.to_string();
        assert!(
            msg.contains("reg.example:5000") && msg.contains("other.example"),
            "{msg}"
        );
        // A port is part of the host: reg.example is not reg.example:5000.
        let json = br#"{"auths":{"reg.example":{"auth":"YTpi"}}}"#;
        assert!(RegistryAuth::from_docker_config_json(json, "reg.example:5000").is_err());
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        for (json, want) in [
            (&br#"{"auths":{"r":{"auth":"!!!"}}}"#[..], "not base64"),
            (
                &br#"{"auths":{"r":{"auth":"YWJj"}}}"#[..],
                "no `user:password`",
            ),
            (
                &br#"{"auths":{"r":{"identitytoken":"t"}}}"#[..],
                "identity token",
            ),
            (&br#"{"auths":{"r":{}}}"#[..], "neither"),
            (&b"not json"[..], "does not parse"),
        ] {
            let e = RegistryAuth::from_docker_config_json(json, "r").expect_err("refused");
            assert!(e.to_string().contains(want), "{e} should say {want}");
        }
        let big = vec![b' '; MAX_DOCKER_CONFIG + 1];
        let e = RegistryAuth::from_docker_config_json(&big, "r").expect_err("too big");
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
