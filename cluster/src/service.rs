//! The page service: a host agent serves pages by identity to a migration destination or a
//! restore that lacks them. It runs over [`fabric::migration::ServiceChannel`], the
//! migration channel (same key files, key proofs both ways, a MAC and sequence number on
//! every frame, payloads bounded before they are read) under its own magic and key labels.
//!
//! ```text
//! client                                   server (host agent)
//!   hello, Auth ───────────────────────────>   (a wrong key: both ends fail AuthFailed)
//!   <──────────────────────────── hello, Auth
//!   PageRequest  count u32 | 0 u32 | id [32] × count          (1 ≤ count ≤ 256)
//!   <──── PageReply  count u32 | held u32 | flag u8 × count (0 absent, 1 held)
//!                    | page [4096] × held, in request order
//!   ... more requests on the same connection; the client closes
//! ```
//!
//! The server re-hashes every page before it sends it (whatever its source said), and the
//! client checks every page against the identity it asked for and treats a mismatch as
//! absent, so a lying or broken server costs misses, never a wrong page.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use fabric::migration::wire::SERVICE_MAX_IDS;
use fabric::migration::{MigrationError, MigrationKey, ServiceChannel};
use fabric::{Page, PageId, PAGE_SIZE};

use crate::control::{self, ControlError, ControlReply, ControlRequest};

/// How long either end waits for the other before it gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the page service, at either end.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The address does not resolve or the connection failed.
    #[error("page service at {0}")]
    Connect(String, #[source] io::Error),
    /// The channel (handshake, key, frames, timeouts).
    #[error(transparent)]
    Channel(#[from] MigrationError),
    /// A payload that is not as specified.
    #[error("page service message malformed: {0}")]
    Malformed(&'static str),
    /// A control message that is not as specified.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Encodes a request for `ids` (at most [`SERVICE_MAX_IDS`]).
pub fn encode_request(ids: &[PageId]) -> Vec<u8> {
    assert!(
        !ids.is_empty() && ids.len() <= SERVICE_MAX_IDS,
        "request size"
    );
    let mut out = Vec::with_capacity(8 + ids.len() * 32);
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    ids.iter()
        .for_each(|id| out.extend_from_slice(id.as_bytes()));
    out
}

/// Decodes a request: the identities asked for.
pub fn decode_request(b: &[u8]) -> Result<Vec<PageId>, ServiceError> {
    let (count, rest) = counts(b)?;
    if count.1 != 0 {
        return Err(ServiceError::Malformed("reserved field set"));
    }
    let count = count.0;
    if count == 0 || count > SERVICE_MAX_IDS {
        return Err(ServiceError::Malformed("identity count out of range"));
    }
    if rest.len() != count * 32 {
        return Err(ServiceError::Malformed("request length"));
    }
    Ok(rest
        .chunks_exact(32)
        .map(|c| PageId(c.try_into().expect("32 bytes")))
        .collect())
}

/// Encodes a reply: for each identity asked, its page or nothing.
pub fn encode_reply(pages: &[Option<&Page>]) -> Vec<u8> {
    let held = pages.iter().filter(|p| p.is_some()).count();
    let mut out = Vec::with_capacity(8 + pages.len() + held * PAGE_SIZE);
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    out.extend_from_slice(&(held as u32).to_le_bytes());
    out.extend(pages.iter().map(|p| u8::from(p.is_some())));
    pages
        .iter()
        .flatten()
        .for_each(|p| out.extend_from_slice(&p[..]));
    out
}

/// Decodes the reply to a request of `asked` identities, checking each page against the one
/// asked for: a page that does not match is reported absent and counted in `mismatched`.
pub fn decode_reply(
    b: &[u8],
    asked: &[PageId],
    mismatched: &mut u64,
) -> Result<Vec<Option<Box<Page>>>, ServiceError> {
    let ((count, held), rest) = counts(b)?;
    if count != asked.len() || held > count {
        return Err(ServiceError::Malformed("reply count"));
    }
    if rest.len() != count + held * PAGE_SIZE {
        return Err(ServiceError::Malformed("reply length"));
    }
    let (flags, mut bodies) = rest.split_at(count);
    if flags.iter().any(|&f| f > 1) || flags.iter().filter(|&&f| f == 1).count() != held {
        return Err(ServiceError::Malformed("reply flags"));
    }
    let mut out = Vec::with_capacity(count);
    for (id, &flag) in asked.iter().zip(flags) {
        if flag == 0 {
            out.push(None);
            continue;
        }
        let (body, next) = bodies.split_at(PAGE_SIZE);
        bodies = next;
        let page: &Page = body.try_into().expect("one page");
        if id.matches(page) {
            out.push(Some(Box::new(*page)));
        } else {
            *mismatched += 1;
            out.push(None);
        }
    }
    Ok(out)
}

fn counts(b: &[u8]) -> Result<((usize, usize), &[u8]), ServiceError> {
    if b.len() < 8 {
        return Err(ServiceError::Malformed("truncated"));
    }
    let a = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    let c = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
    Ok(((a, c), &b[8..]))
}

/// A client of one host's page service.
#[derive(Debug)]
pub struct PageClient {
    ch: ServiceChannel<TcpStream>,
    mismatched: u64,
}

impl PageClient {
    /// Connects to `addr` and proves `key`, each step within `timeout`.
    pub fn connect(
        addr: &str,
        key: &MigrationKey,
        timeout: Duration,
    ) -> Result<Self, ServiceError> {
        let err = |e| ServiceError::Connect(addr.to_string(), e);
        let sock = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
        let stream = TcpStream::connect_timeout(&sock, timeout).map_err(err)?;
        stream.set_read_timeout(Some(timeout)).map_err(err)?;
        stream.set_write_timeout(Some(timeout)).map_err(err)?;
        let _ = stream.set_nodelay(true);
        let ch = ServiceChannel::connect(stream, key)?;
        Ok(PageClient { ch, mismatched: 0 })
    }

    /// The pages with identities `ids`, in order; `None` for those the host does not hold
    /// (or sent wrong: see [`PageClient::mismatched`]).
    pub fn fetch(&mut self, ids: &[PageId]) -> Result<Vec<Option<Box<Page>>>, ServiceError> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(SERVICE_MAX_IDS) {
            self.ch.send(&encode_request(batch))?;
            let reply = self.ch.recv()?;
            out.extend(decode_reply(reply, batch, &mut self.mismatched)?);
        }
        Ok(out)
    }

    /// Pages the server sent that did not match their identity (treated as absent).
    pub fn mismatched(&self) -> u64 {
        self.mismatched
    }

    /// Sends a control request and returns its final reply, handing each `Progress` reply
    /// before it to `progress` (see [`crate::control`]).
    pub fn control(
        &mut self,
        req: &ControlRequest,
        mut progress: impl FnMut(&ControlReply),
    ) -> Result<ControlReply, ServiceError> {
        self.ch.send(&control::encode_request(req))?;
        loop {
            match control::decode_reply(self.ch.recv()?)? {
                p @ ControlReply::Progress { .. } => progress(&p),
                reply => return Ok(reply),
            }
        }
    }
}

/// Fetches `ids` from the page service at `addr` (one connection; [`IO_TIMEOUT`]).
pub fn fetch_pages(
    addr: &str,
    key: &MigrationKey,
    ids: &[PageId],
) -> Result<Vec<Option<Box<Page>>>, ServiceError> {
    PageClient::connect(addr, key, IO_TIMEOUT)?.fetch(ids)
}

/// Serves one connection until the client closes it (Ok) or misbehaves (an error; the
/// client is told why when the channel still works). `source` fills a page by identity and
/// says whether it has it; every page it gives is re-hashed here before it is sent, and one
/// that does not match is sent as absent.
/// Each read and write waits at most `timeout` ([`IO_TIMEOUT`] in the agent).
pub fn serve(
    stream: TcpStream,
    key: &MigrationKey,
    timeout: Duration,
    source: impl FnMut(&[PageId], &mut [Page]) -> Vec<bool>,
) -> Result<ServeStats, ServiceError> {
    serve_with_control(stream, key, timeout, source, |_, reply| {
        reply(&ControlReply::Failed {
            error: "this page service takes no control requests".into(),
        })
    })
}

/// What answers a control request: it sends its replies through the function it is given
/// (progress replies, then exactly one final reply), and stops when that fails.
pub type Reply<'a> = dyn FnMut(&ControlReply) -> Result<(), ServiceError> + 'a;

/// [`serve`], with control requests ([`crate::control`]) handed to `control`.
pub fn serve_with_control(
    stream: TcpStream,
    key: &MigrationKey,
    timeout: Duration,
    mut source: impl FnMut(&[PageId], &mut [Page]) -> Vec<bool>,
    mut control: impl FnMut(ControlRequest, &mut Reply<'_>) -> Result<(), ServiceError>,
) -> Result<ServeStats, ServiceError> {
    let timeout = Some(timeout);
    let err = |e| ServiceError::Connect("client".into(), e);
    stream.set_read_timeout(timeout).map_err(err)?;
    stream.set_write_timeout(timeout).map_err(err)?;
    let _ = stream.set_nodelay(true);
    let mut ch = ServiceChannel::accept(stream, key)?;
    let mut stats = ServeStats::default();
    let mut pages = vec![[0u8; PAGE_SIZE]; SERVICE_MAX_IDS];
    loop {
        let ids = match ch.recv() {
            Ok(payload) if control::is_control(payload) => {
                let req = match control::decode_request(payload) {
                    Ok(req) => req,
                    Err(e) => {
                        ch.abort(&e.to_string());
                        return Err(e.into());
                    }
                };
                stats.control += 1;
                control(req, &mut |reply: &ControlReply| {
                    ch.send(&control::encode_reply(reply)).map_err(Into::into)
                })?;
                continue;
            }
            Ok(payload) => match decode_request(payload) {
                Ok(ids) => ids,
                Err(e) => {
                    ch.abort(&e.to_string());
                    return Err(e);
                }
            },
            Err(MigrationError::Disconnected) => return Ok(stats),
            Err(e) => return Err(e.into()),
        };
        let pages = &mut pages[..ids.len()];
        let held = source(&ids, pages);
        let reply: Vec<Option<&Page>> = ids
            .iter()
            .zip(pages.iter())
            .zip(held)
            .map(|((id, page), held)| {
                let ok = held && id.matches(page);
                stats.mismatched += u64::from(held && !ok);
                ok.then_some(page)
            })
            .collect();
        stats.requests += 1;
        stats.asked += ids.len() as u64;
        stats.served += reply.iter().filter(|p| p.is_some()).count() as u64;
        ch.send(&encode_reply(&reply))?;
    }
}

/// What one connection was served.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ServeStats {
    pub requests: u64,
    pub asked: u64,
    pub served: u64,
    /// Pages the source gave that did not hash to their identity (sent as absent).
    pub mismatched: u64,
    /// Control requests answered.
    pub control: u64,
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
