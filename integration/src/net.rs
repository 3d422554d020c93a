//! Addresses for tests: free ports, and a private loopback address per pod.
//!
//! Every pod gets its own 127.x.y.z address so that sidecars can bind the same inbound
//! port number side by side, as they would on separate pod IPs. The second octet is
//! derived from the process id so that test binaries running at once do not collide.
//!
//! Ports handed out by [`free_port`] come from below the kernel's ephemeral range
//! (32768–60999 on Linux), in a block chosen by the process id, each at most once per
//! process. A port taken with `bind(0)` and released would be in the ephemeral range,
//! where another test's `bind(0)` server or an outgoing connection can take it before
//! the intended owner binds it: a TCP client once reached a parallel test's HTTP server
//! that way and read "400 Bad Request" instead of its echo.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// First port of the range [`free_port`] hands out; the range ends where the kernel's
/// ephemeral ports begin.
const RANGE_START: u32 = 20_000;
const BLOCK: u32 = 1_000;
const BLOCKS: u32 = 12;

/// A TCP port, free on 127.0.0.1 right now, that none of this process's last 12,000
/// calls returned and that no `bind(0)` will pick.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let block = std::process::id() % BLOCKS;
    for _ in 0..BLOCK * BLOCKS {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Start in this process's block and spill over into the others if it runs out.
        let port = RANGE_START + (block * BLOCK + n) % (BLOCK * BLOCKS);
        let port = u16::try_from(port).expect("port range fits u16");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free port left in {RANGE_START}..{}",
        RANGE_START + BLOCK * BLOCKS
    );
}

/// A fresh loopback address for a pod.
pub fn pod_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let second = 10 + (std::process::id() % 200) as u8;
    Ipv4Addr::new(127, second, (n / 250) as u8, (n % 250 + 1) as u8)
}
