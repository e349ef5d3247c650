//! A client that speaks to a plugin socket exactly as dockerd does: HTTP/1.1 over the
//! unix socket, keep-alive, POST with the Docker plugin headers and compact JSON.
//! Tests use the panicking methods; the benchmark uses the `try_` ones, whose errors
//! it reports instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// A keep-alive HTTP/1.1 connection to the plugin socket.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Why no answer could be read.
pub enum NoAnswer {
    /// The plugin closed (or reset) the connection before a status line.
    Closed,
    /// An answer came but could not be read or is not JSON.
    Bad(String),
}

impl Conn {
    pub fn open(socket: &Path) -> Conn {
        Conn::try_open(socket).expect("connecting to the plugin socket")
    }

    pub fn try_open(socket: &Path) -> Result<Conn, String> {
        let s = UnixStream::connect(socket)
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(150)))
            .map_err(|e| format!("setting the read timeout: {e}"))?;
        Ok(Conn {
            reader: BufReader::new(
                s.try_clone()
                    .map_err(|e| format!("cloning the socket: {e}"))?,
            ),
            writer: s,
        })
    }

    /// Sends what dockerd sends: POST, Host plugin.moby.localhost, the v1.2 Accept
    /// header, no Content-Type, compact JSON plus a trailing newline (Activate: empty).
    pub fn send(&mut self, endpoint: &str, body: &str) {
        self.try_send(endpoint, body).unwrap();
    }

    pub fn try_send(&mut self, endpoint: &str, body: &str) -> Result<(), String> {
        let body = if body.is_empty() {
            String::new()
        } else {
            format!("{body}\n")
        };
        let req = format!(
            "POST /{endpoint} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: {}\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n\r\n{body}",
            body.len()
        );
        self.writer
            .write_all(req.as_bytes())
            .map_err(|e| format!("sending {endpoint}: {e}"))
    }

    /// Sends raw bytes, ignoring a server that stops reading early (it may answer a
    /// request before the body is complete, e.g. 413 for an oversized body).
    pub fn send_raw_lenient(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// Reads one response: (status, JSON body). Panics if the plugin closed the connection.
    pub fn receive(&mut self) -> (u16, Value) {
        self.try_receive()
            .expect("the plugin closed the connection without answering")
    }

    /// Like `receive`, but `None` when the connection was closed unanswered.
    pub fn try_receive(&mut self) -> Option<(u16, Value)> {
        match self.read_answer() {
            Ok(answer) => Some(answer),
            Err(NoAnswer::Closed) => None,
            Err(NoAnswer::Bad(why)) => panic!("{why}"),
        }
    }

    /// Reads one response: (status, JSON body).
    pub fn read_answer(&mut self) -> Result<(u16, Value), NoAnswer> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
            return Err(NoAnswer::Closed);
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(NoAnswer::Closed)?;
        let bad = |what: &str, e: &dyn std::fmt::Display| NoAnswer::Bad(format!("{what}: {e}"));
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader
                .read_line(&mut h)
                .map_err(|e| bad("reading headers", &e))?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(|e| bad("content-length", &e))?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| bad("reading the body", &e))?;
        let v = serde_json::from_slice(&body).map_err(|e| {
            NoAnswer::Bad(format!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        Ok((status, v))
    }

    pub fn request(&mut self, endpoint: &str, body: &str) -> (u16, Value) {
        self.send(endpoint, body);
        self.receive()
    }

    /// One request and its answer, or what went wrong.
    pub fn try_request(&mut self, endpoint: &str, body: &str) -> Result<(u16, Value), String> {
        self.try_send(endpoint, body)?;
        self.read_answer().map_err(|e| match e {
            NoAnswer::Closed => format!("{endpoint}: the plugin closed the connection"),
            NoAnswer::Bad(why) => format!("{endpoint}: {why}"),
        })
    }

    pub fn raw(&mut self) -> &mut UnixStream {
        &mut self.writer
    }
}
