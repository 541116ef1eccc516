//! The page service's channel: the migration channel (hello, key proofs, per-direction
//! MACs, sequence numbers, bounded payloads) speaking [`Protocol::PageService`], so a host
//! agent serves pages under the same key files and the same guarantees as a migration. The
//! client takes the source's role, the server the destination's. What the payloads mean is
//! the cluster crate's business (`cluster::service`); this type only moves authenticated
//! `PageRequest` and `PageReply` payloads.

use std::io::{Read, Write};

use super::channel::{Channel, HelloParams};
use super::wire::{MsgType, Protocol, Role, VERSION_MAX, VERSION_MIN};
use super::{Limits, MigrationError, MigrationKey};

/// One end of an authenticated page-service connection.
#[derive(Debug)]
pub struct ServiceChannel<S> {
    ch: Channel<S>,
}

impl<S: Read + Write> ServiceChannel<S> {
    /// The client's end: hello and key proofs both ways over `stream` (give it timeouts).
    pub fn connect(stream: S, key: &MigrationKey) -> Result<Self, MigrationError> {
        Self::establish(stream, key, Role::Source)
    }

    /// The server's end of a connection a client opened.
    pub fn accept(stream: S, key: &MigrationKey) -> Result<Self, MigrationError> {
        Self::establish(stream, key, Role::Destination)
    }

    fn establish(stream: S, key: &MigrationKey, role: Role) -> Result<Self, MigrationError> {
        let own = HelloParams {
            protocol: Protocol::PageService,
            role,
            versions: (VERSION_MIN, VERSION_MAX),
            features: 0,
            max_batch: 0,
            max_runs: 0,
            max_window: 0,
        };
        let (ch, _peer, _version) = Channel::establish(stream, key, own, Limits::default())?;
        Ok(ServiceChannel { ch })
    }

    /// Sends a request (client) or a reply (server): the message type follows the role.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let kind = match self.ch.role() {
            Role::Source => MsgType::PageRequest,
            Role::Destination => MsgType::PageReply,
        };
        self.ch.send(kind, payload)
    }

    /// The next message from the peer: a request (server) or a reply (client), its length
    /// bounded by [`super::wire::SERVICE_MAX_IDS`] before it is read. `Abort` from the peer
    /// is [`MigrationError::PeerAborted`].
    pub fn recv(&mut self) -> Result<&[u8], MigrationError> {
        match self.ch.recv()? {
            (MsgType::PageRequest | MsgType::PageReply, payload) => Ok(payload),
            (MsgType::Abort, reason) => Err(MigrationError::PeerAborted(
                super::wire::decode_abort(reason),
            )),
            (other, _) => Err(MigrationError::Unexpected {
                got: other.name(),
                when: "on a page-service channel",
            }),
        }
    }

    /// Tells the peer why this end gives up (ignoring failure: it may be gone).
    pub fn abort(&mut self, reason: &str) {
        self.ch.send_abort(reason);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::thread;

    use super::*;
    use crate::migration::Receiver;

    fn key(b: u8) -> MigrationKey {
        MigrationKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn request_and_reply_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut ch = ServiceChannel::accept(b, &key(1)).unwrap();
            let req = ch.recv().unwrap().to_vec();
            ch.send(&[req, b"-reply".to_vec()].concat()).unwrap();
        });
        let mut ch = ServiceChannel::connect(a, &key(1)).unwrap();
        ch.send(b"ask").unwrap();
        assert_eq!(ch.recv().unwrap(), b"ask-reply");
        server.join().unwrap();
    }

    #[test]
    fn wrong_key_fails_both_ends() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || ServiceChannel::accept(b, &key(1)).map(|_| ()));
        let client = ServiceChannel::connect(a, &key(2)).map(|_| ());
        assert!(
            matches!(client, Err(MigrationError::AuthFailed)),
            "{client:?}"
        );
        let server = server.join().unwrap();
        assert!(
            matches!(server, Err(MigrationError::AuthFailed)),
            "{server:?}"
        );
    }

    #[test]
    fn a_migration_peer_is_not_a_page_service_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        let dest = thread::spawn(move || Receiver::accept(b, &key(1), Default::default()).err());
        let client = ServiceChannel::connect(a, &key(1)).map(|_| ());
        assert!(
            matches!(client, Err(MigrationError::NotAPeer(_))),
            "{client:?}"
        );
        assert!(dest.join().unwrap().is_some());
    }
}
