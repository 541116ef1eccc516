//! `fabvm ctl`: sends one request to a VMM's API socket and returns its response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Request, Response};

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
    /// The server answered something that is not a response.
    #[error("API socket {0} sent a malformed response")]
    Malformed(PathBuf),
}

/// Sends `request` and waits (up to `timeout`) for the response.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    call_with_progress(path, request, timeout, |_| {})
}

/// [`call`], handing each interim progress report to `progress` as it arrives.
pub fn call_with_progress(
    path: &Path,
    request: &Request,
    timeout: Duration,
    mut progress: impl FnMut(&serde_json::Value),
) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut answer = String::new();
        if reader.read_line(&mut answer).map_err(io)? == 0 {
            return Err(ClientError::Malformed(path.to_path_buf()));
        }
        let value: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|_| ClientError::Malformed(path.to_path_buf()))?;
        if let Some(report) = value.get("progress") {
            progress(report);
            continue;
        }
        return serde_json::from_value(value)
            .map_err(|_| ClientError::Malformed(path.to_path_buf()));
    }
}
