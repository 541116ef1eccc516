//! Errors of the migration protocol: one enum for both ends, so the VMM can tell a timeout,
//! a vanished peer, a wrong key and a damaged stream apart.

use std::io;

/// Errors of making a [`super::MigrationKey`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Fewer secret bytes than [`super::MigrationKey::MIN_LEN`].
    #[error("migration key has {0} bytes, at least 16 are needed")]
    TooShort(usize),
    /// Hex text with an odd number of digits.
    #[error("migration key is not valid hex")]
    BadHex,
    /// The system's random number generator failed.
    #[error("no randomness available")]
    NoRandomness,
}

/// Errors of a migration, on either end.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A read or write hit the transport's timeout (the link stalled or the peer hangs).
    #[error("migration stream timed out")]
    TimedOut,
    /// The peer closed the connection or it was reset.
    #[error("migration peer disconnected")]
    Disconnected,
    /// Another transport error.
    #[error("migration stream")]
    Io(#[source] io::Error),
    /// The peer does not speak this protocol (bad magic or the same role as ours).
    #[error("peer is not a fabvm migration {0}")]
    NotAPeer(&'static str),
    /// The two ends share no protocol version.
    #[error("no common protocol version: ours {ours:?}, peer's {peer:?}")]
    VersionMismatch {
        /// Versions we speak (lowest, highest).
        ours: (u16, u16),
        /// Versions the peer speaks.
        peer: (u16, u16),
    },
    /// The peer could not prove it holds the key (or we could not).
    #[error("migration authentication failed")]
    AuthFailed,
    /// A message failed its MAC: it was damaged or forged in flight.
    #[error("message {seq} failed authentication")]
    BadMac {
        /// The sequence number the message claimed.
        seq: u64,
    },
    /// A message arrived out of order or twice.
    #[error("message out of sequence: expected {expected}, got {got}")]
    OutOfSequence {
        /// The next sequence number due.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// A message of a type not allowed at this point.
    #[error("unexpected {got} message {when}")]
    Unexpected {
        /// The message type received.
        got: &'static str,
        /// Where in the protocol.
        when: &'static str,
    },
    /// A message is not well formed.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// The message or field.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
    /// A length or count exceeds the limits.
    #[error("{what} of {len} exceeds the limit of {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// The value received.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A guest frame outside the described regions.
    #[error("guest frame {gfn:#x} is outside the guest's memory")]
    GfnOutOfRange {
        /// The frame.
        gfn: u64,
    },
    /// A guest frame appears twice in one round.
    #[error("guest frame {gfn:#x} offered twice in round {round}")]
    DuplicateGfn {
        /// The frame.
        gfn: u64,
        /// The round.
        round: u32,
    },
    /// A page did not match its identity and was not sent again; it was not installed.
    #[error("page for guest frame {gfn:#x} does not match its identity")]
    BadPage {
        /// The frame the page was for.
        gfn: u64,
    },
    /// The source completed without covering a page.
    #[error("guest frame {gfn:#x} was never sent")]
    Incomplete {
        /// The first frame missing.
        gfn: u64,
    },
    /// The peer gave up and said why.
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// The caller used the API out of order or with bad arguments.
    #[error("migration API misuse: {0}")]
    Misuse(&'static str),
    /// An earlier call failed (or the migration finished); this end is unusable.
    #[error("migration already failed or finished")]
    Unusable,
}

impl MigrationError {
    /// Whether the transport timed out (the VMM may report a stalled link).
    pub fn is_timeout(&self) -> bool {
        matches!(self, MigrationError::TimedOut)
    }

    /// Errors caused by the peer or the link, after which telling the peer why is
    /// pointless (it left, or it told us).
    pub(crate) fn is_peer_or_link(&self) -> bool {
        matches!(
            self,
            MigrationError::TimedOut
                | MigrationError::Disconnected
                | MigrationError::Io(_)
                | MigrationError::PeerAborted(_)
                | MigrationError::NotAPeer(_)
                | MigrationError::VersionMismatch { .. }
                | MigrationError::AuthFailed
                | MigrationError::Unusable
        )
    }
}

impl From<io::Error> for MigrationError {
    fn from(e: io::Error) -> Self {
        use io::ErrorKind as K;
        match e.kind() {
            K::TimedOut | K::WouldBlock => MigrationError::TimedOut,
            K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => {
                MigrationError::Disconnected
            }
            _ => MigrationError::Io(e),
        }
    }
}
