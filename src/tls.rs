//! TLS server configuration: rustls with the ring provider (ring is the one
//! crypto library), certificate chain and key from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::StartError;

fn tls_err(path: &Path, message: impl std::fmt::Display) -> StartError {
    StartError::Tls {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Build the rustls server config, or say which file is wrong and why.
pub fn load(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, StartError> {
    let (Some(cert_path), Some(key_path)) = (&cfg.cert, &cfg.key) else {
        return Err(StartError::Tls {
            path: Default::default(),
            message: "tls.cert and tls.key must both be set".into(),
        });
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| tls_err(cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(cert_path, e))?;
    if certs.is_empty() {
        return Err(tls_err(cert_path, "no CERTIFICATE block found"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| tls_err(key_path, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert_path, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(key_path, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
