//! The authenticated message channel under both state machines: the hello exchange and
//! key proofs, then frames with a sequence number and a keyed-blake3 MAC each (over all
//! of the payload but page bodies, see [`super::wire::sealed_len`]), with every payload
//! length bounded before it is read. Counts bytes as the protocol sees them.

use std::io::{ErrorKind, Read, Write};

use super::wire::{Header, Hello, MsgType, Protocol, Role, HEADER_LEN, HELLO_LEN, MAC_LEN};
use super::{Limits, MigrationError, MigrationKey, Transport};

/// Read buffer size: small messages are read from it, large payloads straight into place.
const READ_BUF: usize = 64 << 10;

/// Payloads at least this large are MAC'd with blake3's multithreaded mode.
const PARALLEL_MAC: usize = 128 << 10;

/// Bytes and messages through the channel, as the protocol sees them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Everything written: hello, headers, payloads, MACs.
    pub(crate) wire_sent: u64,
    /// Everything read.
    pub(crate) wire_received: u64,
    /// Payload bytes written.
    pub(crate) payload_sent: u64,
    /// Payload bytes read.
    pub(crate) payload_received: u64,
    /// Frames written.
    pub(crate) messages_sent: u64,
    /// Frames read.
    pub(crate) messages_received: u64,
}

/// What this end puts in its hello.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HelloParams {
    pub(crate) protocol: Protocol,
    pub(crate) role: Role,
    pub(crate) versions: (u16, u16),
    pub(crate) features: u16,
    pub(crate) max_batch: u32,
    pub(crate) max_runs: u32,
    pub(crate) max_window: u32,
}

/// Keys and proofs of one session, derived from the pre-shared key and both hellos.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) source_to_destination: [u8; 32],
    pub(crate) destination_to_source: [u8; 32],
    pub(crate) source_proof: [u8; 32],
    pub(crate) destination_proof: [u8; 32],
}

impl Session {
    pub(crate) fn derive(
        key: &MigrationKey,
        protocol: Protocol,
        source_hello: &[u8; HELLO_LEN],
        destination_hello: &[u8; HELLO_LEN],
    ) -> Session {
        let mut transcript = blake3::Hasher::new();
        transcript.update(source_hello);
        transcript.update(destination_hello);
        let th = transcript.finalize();
        let mut material = [0u8; 64];
        material[..32].copy_from_slice(key.bytes());
        material[32..].copy_from_slice(th.as_bytes());
        let proof = |label: &[u8]| {
            let mut h = blake3::Hasher::new_keyed(key.bytes());
            h.update(label);
            h.update(th.as_bytes());
            *h.finalize().as_bytes()
        };
        match protocol {
            Protocol::Migration => Session {
                source_to_destination: blake3::derive_key(
                    "fabvm 2026 migration v1 MAC source to destination",
                    &material,
                ),
                destination_to_source: blake3::derive_key(
                    "fabvm 2026 migration v1 MAC destination to source",
                    &material,
                ),
                source_proof: proof(b"fabvm migration v1 source proof"),
                destination_proof: proof(b"fabvm migration v1 destination proof"),
            },
            // Other labels: a page-service session's keys and proofs are worth nothing in
            // a migration and the other way round, though both come from one key file.
            Protocol::PageService => Session {
                source_to_destination: blake3::derive_key(
                    "fabvm 2026 page service v1 MAC client to server",
                    &material,
                ),
                destination_to_source: blake3::derive_key(
                    "fabvm 2026 page service v1 MAC server to client",
                    &material,
                ),
                source_proof: proof(b"fabvm page service v1 client proof"),
                destination_proof: proof(b"fabvm page service v1 server proof"),
            },
        }
    }
}

/// MAC of a frame: keyed blake3 over the header and the payload's sealed part.
pub(crate) fn frame_mac(key: &[u8; 32], header: &[u8], payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(header);
    if payload.len() >= PARALLEL_MAC {
        h.update_rayon(payload);
    } else {
        h.update(payload);
    }
    h.finalize()
}

/// A whole frame: header, payload, MAC.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn encode_frame(key: &[u8; 32], kind: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        kind,
        flags: 0,
        reserved: 0,
        len: payload.len() as u32,
        seq,
    }
    .encode();
    let sealed = MsgType::from_u8(kind)
        .and_then(|kind| super::wire::sealed_len(kind, payload).ok())
        .unwrap_or(payload.len());
    let mac = frame_mac(key, &header, &payload[..sealed]);
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len() + MAC_LEN);
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(mac.as_bytes());
    frame
}

/// One end of an established, authenticated channel.
#[derive(Debug)]
pub(crate) struct Channel<S> {
    stream: S,
    protocol: Protocol,
    role: Role,
    /// Bounds on what the peer may send.
    limits: Limits,
    send_key: [u8; 32],
    recv_key: [u8; 32],
    send_seq: u64,
    recv_seq: u64,
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    /// Outgoing frame under construction (header placeholder, payload).
    frame: Vec<u8>,
    /// Incoming payload (grown to the largest seen, never shrunk).
    payload: Vec<u8>,
    pub(crate) counters: Counters,
}

impl<S: Read + Write> Channel<S> {
    /// Exchanges hellos, negotiates the version and proves the key both ways. Returns the
    /// channel, the peer's hello and the version agreed.
    pub(crate) fn establish(
        stream: S,
        key: &MigrationKey,
        own: HelloParams,
        limits: Limits,
    ) -> Result<(Channel<S>, Hello, u16), MigrationError> {
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce)
            .map_err(|e| MigrationError::Io(std::io::Error::other(e.to_string())))?;
        Self::establish_with_nonce(stream, key, own, limits, nonce)
    }

    pub(crate) fn establish_with_nonce(
        stream: S,
        key: &MigrationKey,
        own: HelloParams,
        limits: Limits,
        nonce: [u8; 32],
    ) -> Result<(Channel<S>, Hello, u16), MigrationError> {
        let mut ch = Channel {
            stream,
            protocol: own.protocol,
            role: own.role,
            limits,
            send_key: [0; 32],
            recv_key: [0; 32],
            send_seq: 0,
            recv_seq: 0,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            frame: Vec::new(),
            payload: Vec::new(),
            counters: Counters::default(),
        };
        let hello = Hello {
            version_min: own.versions.0,
            version_max: own.versions.1,
            role: own.role,
            features: own.features,
            max_batch: own.max_batch,
            max_runs: own.max_runs,
            max_window: own.max_window,
            nonce,
        }
        .encode_for(own.protocol);
        ch.stream.write_all(&hello)?;
        ch.stream.flush()?;
        ch.counters.wire_sent += HELLO_LEN as u64;

        let mut peer_bytes = [0u8; HELLO_LEN];
        ch.read_exact(&mut peer_bytes)?;
        ch.counters.wire_received += HELLO_LEN as u64;
        let peer = Hello::decode_for(&peer_bytes, own.protocol)?;
        if peer.role != own.role.peer() {
            return Err(MigrationError::NotAPeer(match own.role {
                Role::Source => "destination (it is a source too)",
                Role::Destination => "source (it is a destination too)",
            }));
        }
        let version = own.versions.1.min(peer.version_max);
        if version < own.versions.0.max(peer.version_min) {
            return Err(MigrationError::VersionMismatch {
                ours: own.versions,
                peer: (peer.version_min, peer.version_max),
            });
        }

        let (source_hello, destination_hello) = match own.role {
            Role::Source => (&hello, &peer_bytes),
            Role::Destination => (&peer_bytes, &hello),
        };
        let s = Session::derive(key, own.protocol, source_hello, destination_hello);
        let (own_proof, peer_proof) = match own.role {
            Role::Source => {
                ch.send_key = s.source_to_destination;
                ch.recv_key = s.destination_to_source;
                (s.source_proof, s.destination_proof)
            }
            Role::Destination => {
                ch.send_key = s.destination_to_source;
                ch.recv_key = s.source_to_destination;
                (s.destination_proof, s.source_proof)
            }
        };
        ch.send(MsgType::Auth, &own_proof)?;
        match ch.recv() {
            Ok((MsgType::Auth, proof))
                if <[u8; 32]>::try_from(proof).is_ok_and(|proof| {
                    // blake3::Hash compares in constant time.
                    blake3::Hash::from_bytes(proof) == blake3::Hash::from_bytes(peer_proof)
                }) => {}
            Ok(_) => return Err(MigrationError::AuthFailed),
            Err(
                e @ (MigrationError::TimedOut
                | MigrationError::Disconnected
                | MigrationError::Io(_)),
            ) => return Err(e),
            Err(_) => return Err(MigrationError::AuthFailed),
        }
        Ok((ch, peer, version))
    }

    /// The stream (to set its timeouts).
    pub(crate) fn stream(&self) -> &S {
        &self.stream
    }

    /// This end's role.
    pub(crate) fn role(&self) -> Role {
        self.role
    }

    /// Starts an outgoing frame: append the payload to the returned buffer, then
    /// [`Channel::commit`].
    pub(crate) fn begin(&mut self) -> &mut Vec<u8> {
        self.frame.clear();
        self.frame.resize(HEADER_LEN, 0);
        &mut self.frame
    }

    /// Seals the frame begun with [`Channel::begin`] and writes it in one call.
    pub(crate) fn commit(&mut self, kind: MsgType) -> Result<(), MigrationError> {
        let len = self.frame.len() - HEADER_LEN;
        let header = Header {
            kind: kind as u8,
            flags: 0,
            reserved: 0,
            len: u32::try_from(len).map_err(|_| MigrationError::Misuse("message too large"))?,
            seq: self.send_seq,
        }
        .encode();
        self.frame[..HEADER_LEN].copy_from_slice(&header);
        let sealed = super::wire::sealed_len(kind, &self.frame[HEADER_LEN..])
            .map_err(|_| MigrationError::Misuse("Pages payload without its sealed length"))?;
        let mac = frame_mac(
            &self.send_key,
            &header,
            &self.frame[HEADER_LEN..HEADER_LEN + sealed],
        );
        self.frame.extend_from_slice(mac.as_bytes());
        let written = self
            .stream
            .write_all(&self.frame)
            .and_then(|()| self.stream.flush());
        if let Err(e) = written {
            return Err(self.after_write_error(e.into()));
        }
        self.send_seq += 1;
        self.counters.wire_sent += self.frame.len() as u64;
        self.counters.payload_sent += len as u64;
        self.counters.messages_sent += 1;
        Ok(())
    }

    /// Sends a whole message.
    pub(crate) fn send(&mut self, kind: MsgType, payload: &[u8]) -> Result<(), MigrationError> {
        self.begin().extend_from_slice(payload);
        self.commit(kind)
    }

    /// Sends `Abort{reason}`, ignoring failure (the peer may be gone).
    pub(crate) fn send_abort(&mut self, reason: &str) {
        let buf = self.begin();
        super::wire::encode_abort(buf, reason);
        let _ = self.commit(MsgType::Abort);
    }

    /// When a write fails because the peer closed, it may have said why first: read its
    /// `Abort` if one is there.
    fn after_write_error(&mut self, err: MigrationError) -> MigrationError {
        if !matches!(err, MigrationError::Disconnected) {
            return err;
        }
        match self.recv() {
            Ok((MsgType::Abort, reason)) => {
                MigrationError::PeerAborted(super::wire::decode_abort(reason))
            }
            _ => err,
        }
    }

    /// Reads the next frame: checks the header, bounds the length by the message type and
    /// the limits, reads the payload, checks the MAC, then the sequence number.
    pub(crate) fn recv(&mut self) -> Result<(MsgType, &[u8]), MigrationError> {
        let mut hb = [0u8; HEADER_LEN];
        self.read_exact(&mut hb)?;
        let h = Header::decode(&hb);
        let kind = MsgType::from_u8(h.kind).ok_or(MigrationError::Malformed {
            what: "frame",
            why: "unknown message type",
        })?;
        if !kind.in_protocol(self.protocol) {
            return Err(MigrationError::Unexpected {
                got: kind.name(),
                when: "on this kind of channel",
            });
        }
        if !kind.sent_by(self.role.peer()) {
            return Err(MigrationError::Unexpected {
                got: kind.name(),
                when: "from this end of a migration",
            });
        }
        if h.flags != 0 || h.reserved != 0 {
            return Err(MigrationError::Malformed {
                what: "frame",
                why: "reserved header bits set",
            });
        }
        let limit = kind.max_payload(&self.limits);
        if u64::from(h.len) > limit {
            return Err(MigrationError::TooLarge {
                what: "message payload",
                len: h.len.into(),
                limit,
            });
        }
        let len = h.len as usize;
        let mut payload = std::mem::take(&mut self.payload);
        if payload.len() < len {
            payload.resize(len, 0);
        }
        let read = self.read_exact(&mut payload[..len]);
        self.payload = payload;
        read?;
        let mut mac = [0u8; MAC_LEN];
        self.read_exact(&mut mac)?;
        // A sealed length that does not parse cannot be authenticated either.
        let sealed = super::wire::sealed_len(kind, &self.payload[..len])
            .map_err(|_| MigrationError::BadMac { seq: h.seq })?;
        if frame_mac(&self.recv_key, &hb, &self.payload[..sealed]) != blake3::Hash::from_bytes(mac)
        {
            return Err(MigrationError::BadMac { seq: h.seq });
        }
        if h.seq != self.recv_seq {
            return Err(MigrationError::OutOfSequence {
                expected: self.recv_seq,
                got: h.seq,
            });
        }
        self.recv_seq += 1;
        self.counters.wire_received += (HEADER_LEN + len + MAC_LEN) as u64;
        self.counters.payload_received += len as u64;
        self.counters.messages_received += 1;
        Ok((kind, &self.payload[..len]))
    }

    fn read_exact(&mut self, mut dst: &mut [u8]) -> Result<(), MigrationError> {
        while !dst.is_empty() {
            if self.rpos < self.rend {
                let n = dst.len().min(self.rend - self.rpos);
                dst[..n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
                self.rpos += n;
                dst = &mut dst[n..];
                continue;
            }
            if dst.len() >= READ_BUF {
                let n = read_some(&mut self.stream, dst)?;
                let rest = std::mem::take(&mut dst);
                dst = &mut rest[n..];
            } else {
                self.rend = read_some(&mut self.stream, &mut self.rbuf)?;
                self.rpos = 0;
            }
        }
        Ok(())
    }
}

impl<S: Transport> Channel<S> {
    /// Whether a message (or the end of the stream) is waiting: buffered bytes, or input
    /// on the stream.
    /// Bytes written to the stream that it has not yet sent, when it can tell.
    pub(crate) fn unsent(&self) -> Option<u64> {
        self.stream.unsent()
    }

    pub(crate) fn input_ready(&self) -> bool {
        self.rpos < self.rend || self.stream.has_input()
    }
}

/// One read, retried when interrupted; end of stream is the peer leaving.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> Result<usize, MigrationError> {
    loop {
        match stream.read(buf) {
            Ok(0) => return Err(MigrationError::Disconnected),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
