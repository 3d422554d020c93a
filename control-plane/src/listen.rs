//! Binding meshd's TCP listeners with a listen backlog that survives a connection storm.
//!
//! When every sidecar of a large mesh connects at once (meshd restarted, a node pool
//! rolled), connections that finished the TCP handshake wait in the kernel's accept
//! queue until meshd's accept loop takes them. `tokio::net::TcpListener::bind` gave
//! meshd a backlog of 128 (`ss -ltn` showed it; std's default); when 10,000 proxies
//! connect at once the queue can overflow (`TcpExtListenOverflows`): the kernel drops
//! the handshakes' final ACKs and each such client waits for a SYN retransmit, a
//! second or more added to its initial sync.
//! [`bind`] asks for [`BACKLOG`]; the kernel caps it at `net.core.somaxconn`, which
//! [`bind`] reads and logs when it is lower, so an operator knows to raise it.
//!
//! Every port uses it: one way to bind, and a larger queue costs nothing until used.

use std::net::SocketAddr;
use std::sync::Once;

use tokio::net::{TcpListener, TcpSocket};

/// The accept queue meshd asks for: room for a whole large mesh's proxies connecting
/// at once (the kernel keeps it at `net.core.somaxconn` at most; 65535 is the most
/// Linux accepts for either).
pub const BACKLOG: u32 = 65535;

/// Where Linux keeps the cap on every listen backlog.
const SOMAXCONN: &str = "/proc/sys/net/core/somaxconn";

/// Binds `address` (with `SO_REUSEADDR`, as `TcpListener::bind` does on Unix, so a
/// restarted meshd binds while old connections linger in TIME_WAIT) and listens with
/// [`BACKLOG`]. The cap is logged once per process, not once per port.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    let listener = socket.listen(BACKLOG)?;
    static LOGGED: Once = Once::new();
    if let Some(cap) = somaxconn().filter(|&cap| cap < BACKLOG) {
        LOGGED.call_once(|| {
            tracing::info!(
                requested = BACKLOG,
                backlog = cap,
                "listen backlogs are capped by net.core.somaxconn; raise it if more proxies \
                 than that connect at once (overflows: `nstat -az TcpExtListenOverflows`)"
            )
        });
    }
    Ok(listener)
}

/// The kernel's cap on listen backlogs, if this system has one to read.
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string(SOMAXCONN).ok()?.trim().parse().ok()
}
