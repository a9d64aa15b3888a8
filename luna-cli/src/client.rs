//! A blocking client for luna-server's REST API (see `luna_core::api` for the routes).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use luna_core::api::{ErrorBody, API_PREFIX};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request; its message already names the input.
    #[error("{}", .body.error)]
    Server { status: u16, body: ErrorBody },
    /// An error status without an `ErrorBody` (a proxy, or something that is not luna-server).
    #[error("luna-server at {url} answered {status}: {text}")]
    Http { url: String, status: u16, text: String },
    #[error("cannot reach luna-server at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("invalid answer from luna-server at {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("no admin token: LUNA_TOKEN is not set and the token file '{path}' cannot be read: {err}")]
    TokenFile { path: PathBuf, err: std::io::Error },
    #[error("no admin token: the token file '{0}' is empty")]
    TokenEmpty(PathBuf),
    /// The server's certificate did not verify against the CA file.
    #[error("cannot verify luna-server at {url} against the CA in '{}': {detail}", .ca.display())]
    Untrusted { url: String, ca: PathBuf, detail: String },
    #[error("cannot use the CA file '{}' to verify luna-server (set --ca or LUNA_CA): {reason}", .ca.display())]
    Ca { ca: PathBuf, reason: String },
    #[error(
        "refusing to talk to luna-server at {url} in plain HTTP: the admin API and its token go over HTTPS only \
         (use https://HOST:7051)"
    )]
    PlainHttp { url: String },
}

impl ClientError {
    /// The API's error class, when the server answered with one.
    pub fn code(&self) -> Option<luna_core::api::ErrorCode> {
        match self {
            ClientError::Server { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

pub struct Client {
    /// Built at the first request: verbs that send none (completions, man pages) need no CA file.
    agent: std::sync::OnceLock<ureq::Agent>,
    base: String,
    env_token: Option<String>,
    token_file: PathBuf,
    ca: PathBuf,
}

/// Percent-encodes one path segment: hostlists carry `[`, `]` and `,`.
pub use luna_core::api::percent_encode as encode_segment;

/// `host:port` becomes `https://host:port`; a trailing `/` is dropped.
pub fn normalize_base(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("https://{s}")
    }
}

/// A rustls client configuration trusting only the certificates in the PEM file `ca` (not the
/// system's roots: the admin API's certificate comes from the cluster's own CA, or from whatever
/// CA the admin chose and named here).
pub fn tls_config(ca: &Path) -> Result<std::sync::Arc<rustls::ClientConfig>, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let err = |reason: String| ClientError::Ca { ca: ca.to_path_buf(), reason };
    let pem = std::fs::read(ca).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
        roots.add(cert).map_err(|e| err(format!("unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block in it".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

impl Client {
    /// `env_token` is the value of `LUNA_TOKEN` (taken first); the file is read only when a
    /// request needs the token, so reads work without access to it. `ca` is the PEM file the
    /// server's certificate must verify against; it is read at the first request.
    pub fn new(server: &str, env_token: Option<String>, token_file: &Path, ca: &Path) -> Self {
        Client {
            agent: std::sync::OnceLock::new(),
            base: normalize_base(server),
            env_token: env_token.filter(|t| !t.trim().is_empty()),
            token_file: token_file.to_path_buf(),
            ca: ca.to_path_buf(),
        }
    }

    /// The client for the command line's global flags, with `LUNA_TOKEN` from the environment.
    pub fn from_args(global: &crate::args::GlobalArgs) -> Self {
        Client::new(&global.server, std::env::var("LUNA_TOKEN").ok(), &global.token_file, &global.ca)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The HTTPS agent, built once; a plain `http://` server is refused before anything is sent,
    /// so the token never crosses the network in clear.
    fn agent(&self) -> Result<&ureq::Agent, ClientError> {
        if let Some(a) = self.agent.get() {
            return Ok(a);
        }
        if !self.base.to_ascii_lowercase().starts_with("https://") {
            return Err(ClientError::PlainHttp { url: self.base.clone() });
        }
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls_config(&self.ca)?)
            .timeout_connect(Duration::from_secs(5))
            // Creating thousands of nodes is one request; give the server time.
            .timeout_read(Duration::from_secs(300))
            .build();
        Ok(self.agent.get_or_init(|| agent))
    }

    fn token(&self) -> Result<String, ClientError> {
        if let Some(t) = &self.env_token {
            return Ok(t.trim().to_string());
        }
        let text = std::fs::read_to_string(&self.token_file)
            .map_err(|err| ClientError::TokenFile { path: self.token_file.clone(), err })?;
        let t = text.trim();
        if t.is_empty() {
            return Err(ClientError::TokenEmpty(self.token_file.clone()));
        }
        Ok(t.to_string())
    }

    /// `path` is below the API prefix, already encoded, like `/node/node%5B001-004%5D`.
    pub fn api_url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}{path}", self.base)
    }

    /// A read. The token goes along when there is one (the server may require it for reads);
    /// when there is none and the server wants one, the error says why there is none.
    pub fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let url = self.api_url(path);
        let mut req = self.agent()?.get(&url);
        for (k, v) in query {
            req = req.query(k, v);
        }
        let token = self.token();
        if let Ok(t) = &token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match (self.json(&url, req.call()), token) {
            (Err(e), Err(token_err)) if e.code() == Some(luna_core::api::ErrorCode::Unauthorized) => Err(token_err),
            (res, _) => res,
        }
    }

    /// A write: POST, PATCH or DELETE with the admin token.
    pub fn write(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let url = self.api_url(path);
        let req = self.agent()?.request(method, &url).set("Authorization", &format!("Bearer {}", self.token()?));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        self.json(&url, res)
    }

    /// An event stream under the API (`GET /api/v1/live`) with the admin token: the body as
    /// it arrives (Server-Sent Events), without a read timeout (the server sends a keep-alive
    /// comment every 15 s; a stream silent for 60 s is taken as dead).
    pub fn stream(&self, path: &str) -> Result<impl Read + Send, ClientError> {
        let url = self.api_url(path);
        // its own agent for the longer read timeout; the same trust as every call (the CA only)
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(60))
            .tls_config(tls_config(&self.ca)?)
            .build();
        let res = agent
            .get(&url)
            .set("Authorization", &format!("Bearer {}", self.token()?))
            .set("Accept", "text/event-stream")
            .call()
            .map_err(|e| self.error(&url, e))?;
        Ok(res.into_reader())
    }

    /// A plain-text GET outside the API (boot scripts), `path` with its query.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        // Boot-script previews are admin-only: send the token when there is one.
        let mut req = self.agent()?.get(&url);
        if let Ok(t) = self.token() {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = req.call().map_err(|e| self.error(&url, e))?;
        let mut text = String::new();
        res.into_reader()
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Decode { url: url.clone(), reason: e.to_string() })?;
        Ok(text)
    }

    fn json(&self, url: &str, res: Result<ureq::Response, ureq::Error>) -> Result<Value, ClientError> {
        let res = res.map_err(|e| self.error(url, e))?;
        // Not `into_string`: it caps answers at 10 MB, and a big cluster's node list is larger.
        serde_json::from_reader(res.into_reader())
            .map_err(|e| ClientError::Decode { url: url.to_string(), reason: e.to_string() })
    }

    fn error(&self, url: &str, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, res) => {
                let mut text = String::new();
                let _ = res.into_reader().take(1 << 20).read_to_string(&mut text);
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => ClientError::Server { status, body },
                    Err(_) => {
                        let text = match text.trim() {
                            "" => "no message".to_string(),
                            t => t.to_string(),
                        };
                        ClientError::Http { url: url.to_string(), status, text }
                    }
                }
            }
            ureq::Error::Transport(t) => {
                let mut detail = t.kind().to_string().to_lowercase();
                if let Some(m) = t.message() {
                    detail = format!("{detail}: {m}");
                }
                let mut tls = None;
                let mut src = std::error::Error::source(&t);
                while let Some(s) = src {
                    detail = format!("{detail}: {s}");
                    tls = tls.or_else(|| tls_failure(s));
                    src = s.source();
                }
                match tls {
                    Some(why) => ClientError::Untrusted { url: self.base.clone(), ca: self.ca.clone(), detail: why },
                    None => ClientError::Unreachable { url: self.base.clone(), detail },
                }
            }
        }
    }
}

/// What failed, when `e` is rustls refusing the server's certificate (or the handshake).
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let r = e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<rustls::Error>())
    })?;
    use rustls::CertificateError as C;
    Some(match r {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not signed by this CA (unknown issuer)".into()
        }
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "the server's certificate is not signed by this CA (bad signature)".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the server's certificate is not valid for this host name (add it to [http] tls_names and re-issue)".into()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(c) => format!("the server's certificate is not trusted: {c:?}"),
        other => format!("tls handshake failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("node[001-004],gpu1"), "node%5B001-004%5D%2Cgpu1");
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_segment("rocky9.4_x"), "rocky9.4_x");
    }

    #[test]
    fn base_urls() {
        assert_eq!(normalize_base("http://h:7050/"), "http://h:7050");
        assert_eq!(normalize_base("10.0.0.1:7051"), "https://10.0.0.1:7051");
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        let c = Client::new("h", Some("abc\n".into()), &f, Path::new("/ca"));
        assert_eq!(c.token().unwrap(), "abc");
        let c = Client::new("h", None, &f, Path::new("/ca"));
        let e = c.token().unwrap_err().to_string();
        assert!(e.contains(&f.display().to_string()) && e.contains("LUNA_TOKEN"), "{e}");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(c.token().unwrap(), "s3cret");
        std::fs::write(&f, "\n").unwrap();
        assert!(c.token().unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn refused_connection_names_the_server() {
        // Port 1 on loopback: nothing listens there, so the connect is refused at once.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA).unwrap();
        let c = Client::new("https://127.0.0.1:1", None, Path::new("/nonexistent"), &ca);
        let e = c.get("/network", &[]).unwrap_err().to_string();
        assert!(e.starts_with("cannot reach luna-server at https://127.0.0.1:1: "), "{e}");
    }

    #[test]
    fn plain_http_and_bad_ca_files_are_refused_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            Client::new("http://127.0.0.1:1", Some("s3cr3t-xyz".into()), Path::new("/t"), Path::new("/nonexistent"));
        let e = c.write("POST", "/network", None).unwrap_err().to_string();
        assert!(e.contains("plain HTTP") && e.contains("http://127.0.0.1:1") && !e.contains("s3cr3t"), "{e}");
        let c = Client::new("127.0.0.1:1", None, Path::new("/t"), &dir.path().join("none.pem"));
        let e = c.get("/network", &[]).unwrap_err().to_string();
        assert!(e.contains("none.pem") && e.contains("LUNA_CA"), "{e}");
        std::fs::write(dir.path().join("junk.pem"), "hello").unwrap();
        let c = Client::new("127.0.0.1:1", None, Path::new("/t"), &dir.path().join("junk.pem"));
        let e = c.get("/network", &[]).unwrap_err().to_string();
        assert!(e.contains("junk.pem") && e.contains("no CERTIFICATE"), "{e}");
    }

    /// A throw-away self-signed CA certificate (never used to sign anything here).
    const TEST_CA: &str = include_str!("../tests/assets/test-ca.pem");
}
