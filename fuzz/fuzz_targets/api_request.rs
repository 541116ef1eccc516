//! API requests without a VM: `METHOD SP PATH LF BODY` through `vmm::api::routes::route`, the
//! server's pure part (routing and body decoding). A request it accepts must be one `fabvm
//! ctl` sends to a route of the same operation with a body that decodes to it again; a
//! refused one is a 400, 404 or 405 with a one-line message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::routes;
use vmm::api::Request;

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, path) = head.split_once(' ').unwrap_or((&head, "/"));
    match routes::route(method, path, body) {
        Ok((route, request)) => {
            let (to, fields) = routes::for_request(&request)
                .unwrap_or_else(|e| panic!("{request:?} has no route back: {e}"));
            assert_eq!(to.op, route.op);
            let sent = fields
                .map(|f| serde_json::to_vec(&f).unwrap())
                .unwrap_or_default();
            assert_eq!(routes::request(to, &sent).ok(), Some(request));
        }
        Err(e) => {
            assert!(matches!(e.status(), 400 | 404 | 405), "{e}: {}", e.status());
            let message = e.to_string();
            assert!(
                !message.contains('\n') || method.contains('\n'),
                "two lines: {message}"
            );
        }
    }
    // The same body as a request of the JSON-lines form (`{"op": ...}`).
    if let Ok(request) = serde_json::from_slice::<Request>(body) {
        let json = serde_json::to_vec(&request).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&json).ok(), Some(request));
    }
});
