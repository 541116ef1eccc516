//! `fabvm ctl`'s side of the API socket: one HTTP/1.1 request per connection, the response
//! head parsed by httparse, chunked bodies decoded by chunked_transfer, progress lines of a
//! streamed operation handed over as they arrive.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::routes::{self, RouteError};
use super::{Request, Response, JSON, NDJSON};

/// Longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Errors from talking to an API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error("cannot connect to API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("API socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The server answered something that is not an HTTP response of this API.
    #[error("API socket {path} sent a malformed response: {reason}")]
    Malformed { path: PathBuf, reason: String },
    /// This client does not know where to send the request.
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// Sends `request` and waits (up to `timeout` between reads) for the response.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    call_with_progress(path, request, timeout, |_| {})
}

/// [`call`], handing each interim progress report to `progress` as it arrives.
pub fn call_with_progress(
    path: &Path,
    request: &Request,
    timeout: Duration,
    mut progress: impl FnMut(&Value),
) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let malformed = |reason: &str| ClientError::Malformed {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let (route, body) = routes::for_request(request)?;
    let body = body
        .map(|b| serde_json::to_vec(&b).unwrap_or_default())
        .unwrap_or_default();
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let head = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: {NDJSON}, {JSON}\r\n\
         Content-Type: {JSON}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        route.method.as_str(),
        route.path,
        body.len()
    );
    (&stream).write_all(head.as_bytes()).map_err(io)?;
    (&stream).write_all(&body).map_err(io)?;

    let mut reader = BufReader::new(&stream);
    let head = read_head(&mut reader).map_err(io)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(malformed("unparsable response head")),
    }
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let chunked = header("Transfer-Encoding").is_some_and(|v| v.contains("chunked"));
    let streamed = header("Content-Type").is_some_and(|v| v.starts_with(NDJSON));
    let length = header("Content-Length").and_then(|v| v.trim().parse::<u64>().ok());
    let mut body: Box<dyn BufRead + '_> = if chunked {
        Box::new(BufReader::new(chunked_transfer::Decoder::new(reader)))
    } else {
        Box::new(reader.take(length.unwrap_or(u64::MAX)))
    };

    if streamed {
        loop {
            let mut line = String::new();
            if body.read_line(&mut line).map_err(io)? == 0 {
                return Err(malformed("the stream ended without a result"));
            }
            let value: Value =
                serde_json::from_str(&line).map_err(|_| malformed("a line is not JSON"))?;
            if let Some(report) = value.get("progress") {
                progress(report);
            } else if let Some(result) = value.get("result") {
                return Ok(Response::ok(result.clone()));
            } else if let Some(error) = value.get("error") {
                return Ok(Response::error(error.as_str().unwrap_or("request failed")));
            } else {
                return Err(malformed("a line is neither progress, result nor error"));
            }
        }
    }
    let mut text = Vec::new();
    body.read_to_end(&mut text).map_err(io)?;
    let value: Value = serde_json::from_slice(&text).map_err(|_| malformed("body is not JSON"))?;
    if (200..300).contains(&status) {
        return Ok(Response::ok(value));
    }
    let message = value
        .get("error")
        .and_then(Value::as_str)
        .map_or_else(|| format!("HTTP status {status}"), str::to_string);
    Ok(Response::error(message))
}

/// Reads up to and including the blank line that ends a response head.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = reader
            .take((MAX_HEAD - head.len()) as u64)
            .read_until(b'\n', &mut head)?;
        let line = &head[before..];
        if n == 0 || line == b"\r\n" || line == b"\n" {
            return Ok(head);
        }
        if head.len() >= MAX_HEAD {
            return Err(std::io::Error::other("response head too long"));
        }
    }
}
