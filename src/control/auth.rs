//! The admin token: where it comes from, and checking it in constant time.
//!
//! Sources, first match wins: `WEIR_ADMIN_TOKEN` or `--admin-token-file` (both arrive as
//! `admin.token`), `[admin] token_file`, else a token generated at first start into
//! `<state-dir>/admin.token` with mode 0600. The token itself is never logged.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::config::Config;

pub const TOKEN_FILE: &str = "admin.token";

/// How the token in the shipped Secret template (deploy/kubernetes/admin-token.yaml) begins: a
/// weir started with it would accept a token anyone can read in the repository.
const PLACEHOLDER: &str = "REPLACE-ME";

/// The admin token, kept only as its SHA-256.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
    /// A short, non-secret name for the token in audit records: `admin:<8 hex of its hash>`.
    actor: String,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("actor", &self.actor)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the admin token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the admin token file {path} is empty")]
    Empty { path: PathBuf },
    #[error(
        "the admin token file {path} can be read by every user (mode {mode:o}); run `chmod 600 {path}`"
    )]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error("cannot write a new admin token to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the admin token is empty")]
    EmptyToken,
    #[error(
        "the admin token file {path} holds the shipped placeholder REPLACE-ME...; put a secret in its place, e.g. from `openssl rand -hex 32`"
    )]
    PlaceholderFile { path: PathBuf },
    #[error(
        "the admin token (WEIR_ADMIN_TOKEN) is the shipped placeholder REPLACE-ME...; use a secret, e.g. from `openssl rand -hex 32`"
    )]
    Placeholder,
    #[error("{setting}: {source}")]
    Setting {
        /// The flag or config key that named the token file.
        setting: &'static str,
        source: Box<TokenError>,
    },
}

impl AdminToken {
    pub fn new(token: &str) -> Result<AdminToken, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::EmptyToken);
        }
        if token.starts_with(PLACEHOLDER) {
            return Err(TokenError::Placeholder);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let actor = format!(
            "admin:{}",
            digest[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Ok(AdminToken { digest, actor })
    }

    /// Finds the token for `config`, generating one into the state dir when none is configured.
    pub fn resolve(config: &Config) -> Result<AdminToken, TokenError> {
        if let Some(token) = &config.admin.token {
            return AdminToken::new(token);
        }
        if let Some(path) = &config.admin.token_file {
            let token = read_token_file(path).map_err(|e| TokenError::Setting {
                setting:
                    "admin.token_file (WEIR_ADMIN_TOKEN and --admin-token-file take precedence)",
                source: Box::new(e),
            })?;
            return AdminToken::new(&token);
        }
        let path = config.state_dir.join(TOKEN_FILE);
        if path.exists() {
            return AdminToken::new(&read_token_file(&path)?);
        }
        let token = generate();
        let write_error = |source| TokenError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&config.state_dir).map_err(write_error)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(write_error)?;
        file.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_error)?;
        tracing::info!(path = %path.display(), "generated an admin token (mode 0600); mutating admin calls need `Authorization: Bearer <its content>`");
        AdminToken::new(&token)
    }

    /// Whether an `Authorization` header carries this token. Compares hashes in constant time.
    pub fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(presented) = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_credentials)
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        presented
            .iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    pub fn actor(&self) -> &str {
        &self.actor
    }
}

/// The credentials of a `Bearer` authorization. The scheme is a case-insensitive token
/// (RFC 9110 §11.1): `bearer` and `BEARER` are `Bearer`.
fn bearer_credentials(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(credentials)
}

/// Reads a token file, refusing one that every user can read or that holds the placeholder.
pub fn read_token_file(path: &Path) -> Result<String, TokenError> {
    let read_error = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mode = fs::metadata(path).map_err(read_error)?.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(TokenError::WorldReadable {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let token = fs::read_to_string(path).map_err(read_error)?;
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    if token.starts_with(PLACEHOLDER) {
        return Err(TokenError::PlaceholderFile {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_allowed() {
        let token = AdminToken::new("s3cret").unwrap();
        let header = |v: &'static str| HeaderValue::from_static(v);
        assert!(token.allows(Some(&header("Bearer s3cret"))));
        assert!(token.allows(Some(&header("bearer s3cret"))));
        assert!(token.allows(Some(&header("BEARER s3cret"))));
        assert!(!token.allows(Some(&header("Bearers3cret"))));
        assert!(!token.allows(Some(&header("Bearer-x s3cret"))));
        assert!(!token.allows(Some(&header("Bearer s3cret2"))));
        assert!(!token.allows(Some(&header("Bearer "))));
        assert!(!token.allows(Some(&header("s3cret"))));
        assert!(!token.allows(Some(&header("Basic s3cret"))));
        assert!(!token.allows(None));
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn world_readable_token_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("weir-auth-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        fs::write(&path, "abc\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token_file(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "abc");
        let _ = fs::remove_dir_all(&dir);
    }
}
