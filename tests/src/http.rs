//! The request side of the tiny HTTP/1.1 stand-in servers some VM tests run in place of
//! luna-server (one request per connection, `connection: close` answers).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;

/// One request read off `conn`: method, path with its query, body (by `content-length`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

impl StandInRequest {
    /// The path without its query.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

/// Reads the request line, the headers and the body.
pub fn read_request(conn: &TcpStream) -> std::io::Result<StandInRequest> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(StandInRequest { method, path, body })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn reads_line_headers_and_body() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"POST /boot/status?node=n1 HTTP/1.1\r\nContent-Length: 5\r\nHost: x\r\n\r\nhello").unwrap();
        });
        let (conn, _) = l.accept().unwrap();
        let r = read_request(&conn).unwrap();
        client.join().unwrap();
        assert_eq!((r.method.as_str(), r.route(), r.body.as_slice()), ("POST", "/boot/status", &b"hello"[..]));
        assert_eq!(r.path, "/boot/status?node=n1");
    }
}
