//! The API socket's listener: a thread that accepts connections, reads JSON-line requests and
//! hands each to the VMM's event loop (which owns the VM), then writes back its progress lines
//! (if any) and its response.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{Request, Response, MAX_REQUEST};

/// Errors from starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path is taken by something that is not a stale socket.
    #[error("API socket {0} already exists and is in use")]
    InUse(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A request from a client and where its response goes.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// Send exactly one response here.
    pub reply: Sender<Reply>,
}

/// What the VMM sends back for one request: any number of progress reports (long operations
/// such as a migration), then exactly one final response.
#[derive(Debug)]
pub enum Reply {
    /// An interim `{"progress": ...}` line.
    Progress(serde_json::Value),
    /// The response; the request is done.
    Done(Response),
}

/// The running listener; removes its socket file when dropped.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path`; each request is sent to `calls` and `wake` is signalled.
    pub fn start(
        path: &Path,
        calls: Sender<Call>,
        wake: Arc<EventFd>,
    ) -> Result<Self, ServerError> {
        if path.exists() {
            // A live server answers a connect; a stale socket file from a killed fabvm does not.
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (calls, wake) = (calls.clone(), wake.clone());
                    let _ = std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || serve(stream, &calls, &wake));
                }
            })
            .map_err(|source| ServerError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one connection until the client closes it or sends something unreadable.
fn serve(stream: UnixStream, calls: &Sender<Call>, wake: &EventFd) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream.take(u64::MAX));
    loop {
        let mut line = Vec::new();
        reader.get_mut().set_limit(MAX_REQUEST as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST {
            let _ = send(
                &mut writer,
                &Response::error(format!("request longer than {MAX_REQUEST} bytes")),
            );
            return;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => dispatch(request, calls, wake, &mut writer),
            Err(e) => Response::error(format!("bad request: {e}")),
        };
        if send(&mut writer, &response).is_err() {
            return;
        }
    }
}

/// Hands a request to the VMM, relays its progress lines, and returns its response.
fn dispatch(
    request: Request,
    calls: &Sender<Call>,
    wake: &EventFd,
    writer: &mut UnixStream,
) -> Response {
    let gone = || Response::error("the VM is shutting down");
    let (reply, answer) = channel();
    if calls.send(Call { request, reply }).is_err() {
        return gone();
    }
    let _ = wake.write(1);
    loop {
        match answer.recv() {
            Ok(Reply::Progress(progress)) => {
                let mut line = serde_json::to_vec(&serde_json::json!({ "progress": progress }))
                    .unwrap_or_default();
                line.push(b'\n');
                // A client that stopped listening does not stop the operation.
                let _ = writer.write_all(&line);
            }
            Ok(Reply::Done(response)) => return response,
            Err(_) => return gone(),
        }
    }
}

fn send(writer: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line)
}
