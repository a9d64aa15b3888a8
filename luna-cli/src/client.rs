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
    agent: ureq::Agent,
    base: String,
    env_token: Option<String>,
    token_file: PathBuf,
}

/// Percent-encodes one path segment: hostlists carry `[`, `]` and `,`.
pub use luna_core::api::percent_encode as encode_segment;

/// `host:port` becomes `http://host:port`; a trailing `/` is dropped.
pub fn normalize_base(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

impl Client {
    /// `env_token` is the value of `LUNA_TOKEN` (taken first); the file is read only when a
    /// request needs the token, so reads work without access to it.
    pub fn new(server: &str, env_token: Option<String>, token_file: &Path) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            // Creating thousands of nodes is one request; give the server time.
            .timeout_read(Duration::from_secs(300))
            .build();
        Client {
            agent,
            base: normalize_base(server),
            env_token: env_token.filter(|t| !t.trim().is_empty()),
            token_file: token_file.to_path_buf(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
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
        let mut req = self.agent.get(&url);
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
        let req = self.agent.request(method, &url).set("Authorization", &format!("Bearer {}", self.token()?));
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
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(60))
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
        let mut req = self.agent.get(&url);
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
                let mut src = std::error::Error::source(&t);
                while let Some(s) = src {
                    detail = format!("{detail}: {s}");
                    src = s.source();
                }
                ClientError::Unreachable { url: self.base.clone(), detail }
            }
        }
    }
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
        assert_eq!(normalize_base("10.0.0.1:7050"), "http://10.0.0.1:7050");
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        let c = Client::new("h", Some("abc\n".into()), &f);
        assert_eq!(c.token().unwrap(), "abc");
        let c = Client::new("h", None, &f);
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
        let c = Client::new("http://127.0.0.1:1", None, Path::new("/nonexistent"));
        let e = c.get("/network", &[]).unwrap_err().to_string();
        assert!(e.starts_with("cannot reach luna-server at http://127.0.0.1:1: "), "{e}");
    }
}
