//! A minimal HTTPS client for tests that start luna-server binaries: trusts only the CA that
//! `luna-server init` generated, one HTTP/1.0 request per connection (no chunked replies).

#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Trusts the CA `init` generated; set once `init` ran.
static TLS: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();

pub fn trust_ca(ca: &Path) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(ca).expect("ca.pem")).expect("ca");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = TLS.set(tokio_rustls::TlsConnector::from(Arc::new(config)));
}

/// `METHOD path` on `127.0.0.1:port` over HTTPS with the bearer `token`; the status and the
/// body (empty when there is none).
pub async fn request(
    port: u16,
    token: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> std::io::Result<(u16, Vec<u8>)> {
    request_at(SocketAddr::from(([127, 0, 0, 1], port)), token, method, path, body).await
}

/// [`request`] to the API at `addr` (its certificate names that address).
pub async fn request_at(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let mut s = TLS.get().expect("trust_ca ran").connect(name, tcp).await?;
    let body = body.unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        host = addr.ip()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out).await {
        // A peer that closes without close_notify after the whole answer (HTTP/1.0) is fine.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        r => {
            r?;
        }
    }
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..head_end]);
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out[head_end..].to_vec()))
}
