//! The API socket's HTTP/1.1 server (tiny_http on a Unix socket): a thread takes requests,
//! routes each with [`routes`](super::routes) and hands it to the VMM's event loop (which owns
//! the VM) on a thread of its own, then writes back the response, or the progress lines of a
//! streamed operation as they come.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::{Header, Server};
use vmm_sys_util::eventfd::EventFd;

use super::routes::{self, Answer, Route, RouteError};
use super::{Request, Response, MAX_BODY};
use crate::metrics::prometheus;

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
    /// Send any progress, then exactly one response here.
    pub reply: Sender<Reply>,
}

/// What the VMM sends back for one request: any number of progress reports (long operations
/// such as a migration), then exactly one final response.
#[derive(Debug)]
pub enum Reply {
    /// An interim progress report.
    Progress(serde_json::Value),
    /// The response; the request is done.
    Done(Response),
}

/// The running server; stops and removes its socket file when dropped.
pub struct ApiServer {
    path: PathBuf,
    server: Arc<Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish()
    }
}

/// Where requests go: the event loop's mailbox and the eventfd that wakes it.
#[derive(Debug, Clone)]
struct Vmm {
    calls: Sender<Call>,
    wake: Arc<EventFd>,
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
        let bind = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind)?;
        let vmm = Vmm { calls, wake };
        // The server is made on the API thread, under its seccomp filter: tiny_http's own
        // threads (acceptor, connections) start from there and inherit it.
        let (made_tx, made) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Api);
                let server = match Server::from_listener(listener, None) {
                    Ok(server) => Arc::new(server),
                    Err(e) => {
                        let _ = made_tx.send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                };
                let _ = made_tx.send(Ok(server.clone()));
                // Ends when the server is unblocked (dropped).
                while let Ok(request) = server.recv() {
                    let vmm = vmm.clone();
                    let _ = std::thread::Builder::new()
                        .name("api-request".into())
                        .spawn(move || serve(request, &vmm));
                }
            })
            .map_err(bind)?;
        let server = made
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the API thread ended")))
            .map_err(bind)?;
        Ok(Self {
            path: path.to_path_buf(),
            server,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        // The server itself is dropped here, not on the API thread: closing it connects to
        // the socket and removes it, which the API thread's filter does not allow.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one HTTP request.
fn serve(mut http: tiny_http::Request, vmm: &Vmm) {
    let method = http.method().to_string();
    let route = match routes::find(&method, http.url()) {
        Ok(route) => route,
        Err(e) => return send_route_error(http, &e),
    };
    let body = match read_body(&mut http) {
        Ok(body) => body,
        Err((status, message)) => return send_error(http, status, &message, None),
    };
    let request = match routes::request(route, &body) {
        Ok(request) => request,
        Err(e) => return send_route_error(http, &e),
    };
    if route.answer == Answer::Streamed && wants_stream(&http) {
        return stream(http, request, vmm);
    }
    match vmm.call(request, |_| {}) {
        Some(response) => send_response(http, route, response),
        None => send_error(http, 503, "the VM is shutting down", None),
    }
}

impl Vmm {
    /// Hands a request to the event loop; passes its progress to `progress` and returns its
    /// response (`None`: the loop is gone).
    fn call(&self, request: Request, mut progress: impl FnMut(Value)) -> Option<Response> {
        let (reply, answers): (Sender<Reply>, Receiver<Reply>) = channel();
        self.calls.send(Call { request, reply }).ok()?;
        let _ = self.wake.write(1);
        loop {
            match answers.recv().ok()? {
                Reply::Progress(p) => progress(p),
                Reply::Done(response) => return Some(response),
            }
        }
    }
}

/// The request body, at most [`MAX_BODY`] bytes; else (status, message).
fn read_body(http: &mut tiny_http::Request) -> Result<Vec<u8>, (u16, String)> {
    let too_long = || (413, format!("request body longer than {MAX_BODY} bytes"));
    if http.body_length().is_some_and(|len| len > MAX_BODY) {
        return Err(too_long());
    }
    let mut body = Vec::new();
    http.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| (400, format!("reading the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_long());
    }
    Ok(body)
}

/// Whether the client asked for progress lines (and can take a chunked answer).
fn wants_stream(http: &tiny_http::Request) -> bool {
    let accepts = http
        .headers()
        .iter()
        .any(|h| h.field.equiv("Accept") && h.value.as_str().contains(super::NDJSON));
    accepts && *http.http_version() >= tiny_http::HTTPVersion(1, 1)
}

/// Runs a streamed request: `200` and chunked JSON lines, each sent as soon as it exists.
fn stream(http: tiny_http::Request, request: Request, vmm: &Vmm) {
    let mut writer = http.into_writer();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        super::NDJSON
    );
    if writer.write_all(head.as_bytes()).is_err() || writer.flush().is_err() {
        return;
    }
    let mut body = chunked_transfer::Encoder::with_flush_after_write(writer);
    // A client that stopped listening does not stop the operation.
    let mut line = |value: Value| {
        let _ = body.write_all(&json_line(&value));
        let _ = body.flush();
    };
    let last = match vmm.call(request, |p| line(json!({ "progress": p }))) {
        Some(Response {
            ok: true, result, ..
        }) => json!({ "result": result.unwrap_or_default() }),
        Some(Response { error, .. }) => {
            json!({ "error": error.unwrap_or_else(|| "request failed".into()) })
        }
        None => json!({ "error": "the VM is shutting down" }),
    };
    line(last);
}

fn send_response(http: tiny_http::Request, route: &Route, response: Response) {
    if !response.ok {
        let message = response.error.unwrap_or_else(|| "request failed".into());
        return send_error(http, 500, &message, None);
    }
    let result = response.result.unwrap_or_default();
    match route.answer {
        Answer::Prometheus => send(
            http,
            200,
            prometheus::CONTENT_TYPE,
            prometheus::render(&result, "fabvm").into_bytes(),
            None,
        ),
        Answer::Json | Answer::Streamed => send(http, 200, super::JSON, json_line(&result), None),
    }
}

/// The answer to a request no route takes: its status, with `Allow` on a 405.
fn send_route_error(http: tiny_http::Request, e: &RouteError) {
    let allow = match e {
        RouteError::MethodNotAllowed { path, .. } => Some(routes::allowed(path)),
        _ => None,
    };
    let header = allow.as_deref().map(|methods| ("Allow", methods));
    send_error(http, e.status(), &e.to_string(), header);
}

/// An error answer: `{"error": "one line"}`.
fn send_error(http: tiny_http::Request, status: u16, message: &str, header: Option<(&str, &str)>) {
    let body = json_line(&json!({ "error": message.replace('\n', " ") }));
    send(http, status, super::JSON, body, header);
}

fn send(
    http: tiny_http::Request,
    status: u16,
    content_type: &str,
    body: Vec<u8>,
    header: Option<(&str, &str)>,
) {
    let mut response = tiny_http::Response::from_data(body).with_status_code(status);
    let headers = [Some(("Content-Type", content_type)), header];
    for (name, value) in headers.into_iter().flatten() {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response = response.with_header(h);
        }
    }
    // A client that hung up has nobody to tell.
    let _ = http.respond(response);
}

fn json_line(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}
