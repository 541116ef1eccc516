//! The API server's threads (ours, one per request, and tiny_http's acceptor and connection
//! threads, which inherit this filter): accept connections on the already bound Unix socket,
//! read requests and write responses, and start a thread per connection and per request.
//! Requests are handed to the event loop; these threads touch neither the VM nor files.

use super::rules::{self, Rules};

pub(super) fn rules(r: &mut Rules) {
    rules::spawn_threads(r);
    r.allow(&[
        libc::SYS_accept4,
        libc::SYS_accept,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_writev,
        libc::SYS_shutdown,
        libc::SYS_poll,
        libc::SYS_fcntl,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
    ]);
}
