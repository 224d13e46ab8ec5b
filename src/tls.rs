//! TLS material: server configs for the listeners (with optional client-certificate checks) and
//! the client config for `https://` backends. Cold: read at start and on SIGHUP.
//!
//! Everything uses rustls with the ring provider; listeners offer ALPN h2 and http/1.1.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{BackendTls, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: String },
    #[error("invalid TLS setup: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read {
            what,
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "private key",
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path, "CA certificate")? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The server config of a TLS listener.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&tls.cert, "certificate")?, key(&tls.key)?)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} and {}: {e}",
                tls.cert.display(),
                tls.key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client config for `https://` backends: the system's roots plus a configured CA.
pub fn backend_client_config(tls: &BackendTls) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    // A machine without a readable system store still works with a configured CA.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = &tls.ca {
        for cert in certs(ca, "CA certificate")? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    // ALPN is set by the connector (http/1.1 to backends).
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key_path)) => builder
            .with_client_auth_cert(certs(cert, "client certificate")?, key(key_path)?)
            .map_err(|e| TlsError::Config(format!("client certificate {}: {e}", cert.display())))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}
