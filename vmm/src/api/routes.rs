//! The REST resources of the API socket: one table maps (method, path) to a [`Request`]
//! (by its `op` name) and says how the answer is sent. The server routes with it, `fabvm ctl`
//! finds the route of each request with it, and `docs/api.yaml` is checked against it.
//!
//! Adding a request kind is one entry in [`ROUTES`] (and its variant in [`Request`]).

use serde_json::{Map, Value};

use super::Request;

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Reads a resource; no body.
    Get,
    /// Acts on the VM; an optional JSON object body carries the request's fields.
    Put,
}

impl Method {
    /// The method as HTTP spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// How a route answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `application/json`: the result on success, `{"error": "..."}` otherwise.
    Json,
    /// Like [`Answer::Json`]; a client that accepts `application/x-ndjson` instead gets the
    /// operation's progress as it happens: `{"progress": {...}}` lines, then one
    /// `{"result": {...}}` or `{"error": "..."}` line.
    Streamed,
    /// The `stats` result as a Prometheus text page.
    Prometheus,
}

/// One resource.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Its method.
    pub method: Method,
    /// Its path.
    pub path: &'static str,
    /// The [`Request`] it makes (the `op` tag).
    pub op: &'static str,
    /// How it answers.
    pub answer: Answer,
}

const fn get(path: &'static str, op: &'static str) -> Route {
    Route {
        method: Method::Get,
        path,
        op,
        answer: Answer::Json,
    }
}

const fn put(path: &'static str, op: &'static str) -> Route {
    Route {
        method: Method::Put,
        path,
        op,
        answer: Answer::Json,
    }
}

impl Route {
    const fn streamed(mut self) -> Self {
        self.answer = Answer::Streamed;
        self
    }

    const fn prometheus(mut self) -> Self {
        self.answer = Answer::Prometheus;
        self
    }
}

/// Every resource. `docs/api.yaml` documents exactly these (a test checks).
pub const ROUTES: &[Route] = &[
    get("/vm", "status"),
    get("/vm/stats", "stats"),
    put("/vm/pause", "pause"),
    put("/vm/resume", "resume"),
    put("/vm/snapshot", "snapshot"),
    put("/vm/migrate", "migrate").streamed(),
    put("/vm/shutdown", "shutdown"),
    get("/metrics", "stats").prometheus(),
    put("/vm/identities/check", "identities"),
];

/// Why a request matched no route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No resource at that path.
    #[error("no resource {0}")]
    NotFound(String),
    /// The resource exists but not with that method.
    #[error("{method} is not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: String,
    },
    /// The body is not a JSON object the request accepts.
    #[error("bad request body: {0}")]
    BadBody(String),
    /// A request kind with no route (a `fabvm ctl` built without it).
    #[error("no route for request {0}")]
    NoRoute(String),
}

impl RouteError {
    /// The HTTP status the server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound(_) | RouteError::NoRoute(_) => 404,
            RouteError::MethodNotAllowed { .. } => 405,
            RouteError::BadBody(_) => 400,
        }
    }
}

/// What the server makes of a request's method, path and body: [`find`] then [`request`]
/// (the server reads the body in between, once the route is known).
pub fn route(
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(&'static Route, Request), RouteError> {
    let route = find(method, path)?;
    Ok((route, request(route, body)?))
}

/// The route for `method` and `path` (a query string is ignored).
pub fn find(method: &str, path: &str) -> Result<&'static Route, RouteError> {
    let path = path.split('?').next().unwrap_or(path);
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let on_path: Vec<&Route> = ROUTES.iter().filter(|r| r.path == path).collect();
    if on_path.is_empty() {
        return Err(RouteError::NotFound(path.to_string()));
    }
    on_path
        .iter()
        .find(|r| r.method.as_str().eq_ignore_ascii_case(method))
        .copied()
        .ok_or_else(|| RouteError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed: allowed(path),
        })
}

/// The methods a path allows, for the `Allow` header.
pub fn allowed(path: &str) -> String {
    let methods: Vec<&str> = ROUTES
        .iter()
        .filter(|r| r.path == path)
        .map(|r| r.method.as_str())
        .collect();
    methods.join(", ")
}

/// The request `route` makes from a request body (empty, or a JSON object of its fields).
pub fn request(route: &Route, body: &[u8]) -> Result<Request, RouteError> {
    let bad = |e: &dyn std::fmt::Display| RouteError::BadBody(e.to_string());
    let mut fields = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(body).map_err(|e| bad(&e))? {
            Value::Object(map) => map,
            _ => return Err(bad(&"expected a JSON object")),
        }
    };
    fields.insert("op".into(), route.op.into());
    serde_json::from_value(Value::Object(fields)).map_err(|e| bad(&e))
}

/// The route a client sends `request` to and the body it sends (`None`: no fields).
pub fn for_request(request: &Request) -> Result<(&'static Route, Option<Value>), RouteError> {
    let mut fields = match serde_json::to_value(request) {
        Ok(Value::Object(map)) => map,
        _ => return Err(RouteError::NoRoute(format!("{request:?}"))),
    };
    let op = match fields.remove("op") {
        Some(Value::String(op)) => op,
        _ => return Err(RouteError::NoRoute(format!("{request:?}"))),
    };
    let route = ROUTES
        .iter()
        .find(|r| r.op == op && r.answer != Answer::Prometheus)
        .ok_or(RouteError::NoRoute(op))?;
    Ok((route, (!fields.is_empty()).then_some(Value::Object(fields))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_found_by_method_and_path() {
        assert_eq!(find("GET", "/vm").unwrap().op, "status");
        assert_eq!(find("get", "/vm/").unwrap().op, "status");
        assert_eq!(
            find("GET", "/metrics?x=1").unwrap().answer,
            Answer::Prometheus
        );
        assert_eq!(find("PUT", "/vm/migrate").unwrap().answer, Answer::Streamed);
        assert!(matches!(
            find("GET", "/nope"),
            Err(RouteError::NotFound(path)) if path == "/nope"
        ));
        assert!(matches!(
            find("DELETE", "/vm/pause"),
            Err(RouteError::MethodNotAllowed { allowed, .. }) if allowed == "PUT"
        ));
    }

    #[test]
    fn method_path_and_body_become_a_request_or_a_status() {
        let (found, req) = route("PUT", "/vm/snapshot", br#"{"dir":"/s"}"#).unwrap();
        assert_eq!(found.op, "snapshot");
        assert_eq!(req, Request::Snapshot { dir: "/s".into() });
        let status = |m: &str, p: &str, b: &[u8]| route(m, p, b).unwrap_err().status();
        assert_eq!(status("GET", "/nope", b""), 404);
        assert_eq!(status("GET", "/vm/pause", b""), 405);
        assert_eq!(status("PUT", "/vm/snapshot", b"{"), 400);
        // The route is found before the body is looked at.
        assert_eq!(status("GET", "/nope", b"{"), 404);
    }

    #[test]
    fn bodies_become_requests() {
        let snap = find("PUT", "/vm/snapshot").unwrap();
        assert_eq!(
            request(snap, br#"{"dir":"/tmp/s"}"#).unwrap(),
            Request::Snapshot {
                dir: "/tmp/s".into()
            }
        );
        assert_eq!(
            request(find("PUT", "/vm/pause").unwrap(), b"").unwrap(),
            Request::Pause
        );
        assert_eq!(
            request(find("PUT", "/vm/pause").unwrap(), b"{}").unwrap(),
            Request::Pause
        );
        for bad in [&b"{"[..], b"[]", b"\"x\"", b"{}"] {
            assert!(
                matches!(request(snap, bad), Err(RouteError::BadBody(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A body cannot turn one request into another.
        assert_eq!(
            request(find("PUT", "/vm/pause").unwrap(), br#"{"op":"shutdown"}"#).unwrap(),
            Request::Pause
        );
    }

    #[test]
    fn every_request_has_a_route_and_back() {
        let requests = [
            Request::Pause,
            Request::Resume,
            Request::Status,
            Request::Stats,
            Request::Shutdown,
            Request::Snapshot { dir: "/s".into() },
            Request::Migrate {
                dest: "h:1".into(),
                key: "/k".into(),
                downtime_ms: 5,
                max_rounds: 2,
                compress: false,
                postcopy_after: None,
            },
            Request::Migrate {
                dest: "h:1".into(),
                key: "/k".into(),
                downtime_ms: 5,
                max_rounds: 2,
                compress: true,
                postcopy_after: Some(0),
            },
        ];
        for req in requests {
            let (route, body) = for_request(&req).unwrap();
            let body = body
                .map(|b| serde_json::to_vec(&b).unwrap())
                .unwrap_or_default();
            assert_eq!(request(route, &body).unwrap(), req, "{route:?}");
        }
    }

    /// (method, path) of every operation in `docs/api.yaml`: the keys under `paths:`, two
    /// spaces in, and the methods under them, four spaces in.
    fn documented() -> Vec<(String, String)> {
        let yaml = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.yaml"));
        let mut out = Vec::new();
        let (mut in_paths, mut path) = (false, String::new());
        for line in yaml.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line.starts_with("paths:");
            } else if in_paths {
                if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                    path = format!("/{p}");
                } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
                {
                    if !m.starts_with(' ') {
                        out.push((m.to_ascii_uppercase(), path.clone()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn openapi_document_matches_the_routes() {
        let documented = documented();
        assert!(documented.len() >= 8, "{documented:?}");
        for (method, path) in &documented {
            let route = find(method, path);
            assert!(route.is_ok(), "docs/api.yaml: {method} {path} has no route");
        }
        for route in ROUTES {
            let key = (route.method.as_str().to_string(), route.path.to_string());
            assert!(
                documented.contains(&key),
                "{} {} is not in docs/api.yaml",
                key.0,
                key.1
            );
        }
    }

    #[test]
    fn paths_and_methods_are_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(a.path != b.path || a.method != b.method, "{a:?} twice");
            }
        }
    }
}
