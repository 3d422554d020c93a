//! What one ADS stream may make meshd hold.
//!
//! A proxy that passed the TLS handshake is authenticated, not trusted: a compromised
//! or broken sidecar must not be able to grow meshd's memory or its log without bound.
//! Every request is checked against these limits before it changes the stream's state;
//! a stream past one ends with `RESOURCE_EXHAUSTED`, the limit named in the status and
//! in one log line, and everything it held is freed with its task.
//!
//! | limit | value | what it bounds |
//! |---|---|---|
//! | [`MAX_REQUEST_BYTES`] | 4 MiB | one encoded request (gRPC decoding refuses more) |
//! | [`MAX_TYPE_URL_BYTES`] | 256 | one type URL |
//! | [`MAX_UNKNOWN_TYPES`] | 16 | distinct type URLs meshd does not serve, per stream |
//! | [`MAX_NAME_BYTES`] | 1,024 | one resource name, version, nonce, or the node id |
//! | [`MAX_NAMES`] | 100,000 | resource names a stream subscribes to or says it has, all types |
//! | [`MAX_NAME_TOTAL_BYTES`] | 8 MiB | the bytes of those names and versions |
//! | [`MAX_STREAMS_PER_WORKLOAD`] | 8 | open streams of one identity for one pod |
//! | [`MAX_STREAMS_PER_CONNECTION`] | 16 | concurrent HTTP/2 streams on one connection |
//! | [`MAX_NACK_MESSAGE_BYTES`] | 4 KiB | a NACK's message as kept for `meshctl status` (longer ones are cut, not refused) |
//!
//! The per-stream bounds make one stream cheap; the stream bounds keep one credential
//! from opening many for one pod. A certificate can still open streams for other pod
//! names of its namespace and service account (each served nothing unless that pod runs
//! as that account); bounding that needs the pod to be known before its stream is
//! accepted, which the token-based identity of a later issue brings.
//!
//! A real sidecar stays far below: at 10,000 services an Envoy subscribes to 10,000
//! EDS names of some 60 bytes each (600 KB).

use std::fmt;

pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
pub const MAX_TYPE_URL_BYTES: usize = 256;
pub const MAX_UNKNOWN_TYPES: usize = 16;
pub const MAX_NAME_BYTES: usize = 1024;
pub const MAX_NAMES: usize = 100_000;
pub const MAX_NAME_TOTAL_BYTES: usize = 8 * 1024 * 1024;
pub const MAX_NACK_MESSAGE_BYTES: usize = 4096;
pub const MAX_STREAMS_PER_WORKLOAD: usize = 8;
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// Which limit a stream went past.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("a request of more than {MAX_REQUEST_BYTES} bytes")]
    RequestSize,
    #[error("a type URL of {0} bytes (at most {MAX_TYPE_URL_BYTES})")]
    TypeUrlLength(usize),
    #[error("more than {MAX_UNKNOWN_TYPES} type URLs meshd does not serve")]
    UnknownTypes,
    #[error("a resource name or version of {0} bytes (at most {MAX_NAME_BYTES})")]
    NameLength(usize),
    #[error("{0} resource names (at most {MAX_NAMES})")]
    Names(usize),
    #[error("{0} bytes of resource names (at most {MAX_NAME_TOTAL_BYTES})")]
    NameBytes(usize),
    #[error(
        "a stream for a pod that already has {0} open streams of this identity (at most {MAX_STREAMS_PER_WORKLOAD})"
    )]
    Streams(usize),
}

impl LimitError {
    /// The `reason` label of `meshd_xds_refused_streams_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            LimitError::RequestSize => "request_size",
            LimitError::TypeUrlLength(_) => "type_url_length",
            LimitError::UnknownTypes => "type_urls",
            LimitError::NameLength(_) => "name_length",
            LimitError::Names(_) | LimitError::NameBytes(_) => "names",
            LimitError::Streams(_) => "streams",
        }
    }
}

pub fn check_type_url(type_url: &str) -> Result<(), LimitError> {
    if type_url.len() > MAX_TYPE_URL_BYTES {
        return Err(LimitError::TypeUrlLength(type_url.len()));
    }
    Ok(())
}

/// Checks the length of every name in `names`.
pub fn check_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), LimitError> {
    for name in names {
        if name.len() > MAX_NAME_BYTES {
            return Err(LimitError::NameLength(name.len()));
        }
    }
    Ok(())
}

/// What a stream holds of peer-chosen names, counted after each request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub names: usize,
    pub bytes: usize,
}

impl Held {
    pub fn add(&mut self, name: &str) {
        self.names += 1;
        self.bytes += name.len();
    }

    pub fn check(self) -> Result<(), LimitError> {
        if self.names > MAX_NAMES {
            return Err(LimitError::Names(self.names));
        }
        if self.bytes > MAX_NAME_TOTAL_BYTES {
            return Err(LimitError::NameBytes(self.bytes));
        }
        Ok(())
    }
}

/// `message` cut to at most [`MAX_NACK_MESSAGE_BYTES`] (on a character boundary).
pub fn truncate_message(message: &str) -> String {
    if message.len() <= MAX_NACK_MESSAGE_BYTES {
        return message.to_string();
    }
    let mut end = MAX_NACK_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} more bytes)", &message[..end], message.len() - end)
}

/// Why a stream ended, as its task returns it.
#[derive(Debug)]
pub enum StreamEnd {
    /// The proxy went away, or meshd is stopping: nothing to tell it.
    Gone(String),
    /// meshd ends the stream: the proxy went past a limit.
    Limit(LimitError),
}

impl From<LimitError> for StreamEnd {
    fn from(e: LimitError) -> Self {
        StreamEnd::Limit(e)
    }
}

impl fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamEnd::Gone(reason) => f.write_str(reason),
            StreamEnd::Limit(e) => write!(f, "refused: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_past_their_bound_and_not_before() {
        assert!(check_type_url(&"t".repeat(MAX_TYPE_URL_BYTES)).is_ok());
        assert_eq!(
            check_type_url(&"t".repeat(MAX_TYPE_URL_BYTES + 1)),
            Err(LimitError::TypeUrlLength(MAX_TYPE_URL_BYTES + 1))
        );
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(check_names(["a", "b"]).is_ok());
        assert_eq!(
            check_names(["a", long.as_str()]),
            Err(LimitError::NameLength(MAX_NAME_BYTES + 1))
        );
        let mut held = Held::default();
        for _ in 0..MAX_NAMES {
            held.add("x");
        }
        assert!(held.check().is_ok());
        held.add("x");
        assert_eq!(held.check(), Err(LimitError::Names(MAX_NAMES + 1)));
    }

    #[test]
    fn long_nack_messages_are_cut_on_a_character_boundary() {
        let m = "é".repeat(MAX_NACK_MESSAGE_BYTES);
        let cut = truncate_message(&m);
        assert!(cut.len() < MAX_NACK_MESSAGE_BYTES + 30);
        assert!(cut.ends_with("more bytes)"));
        assert_eq!(truncate_message("short"), "short");
    }
}
