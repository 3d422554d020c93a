//! Addresses for tests: free ports, and a private loopback address per pod.
//!
//! Every pod gets its own 127.x.y.z address so that sidecars can bind the same inbound
//! port number side by side, as they would on separate pod IPs. The second octet is
//! derived from the process id so that test binaries running at once do not collide.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A fresh loopback address for a pod.
pub fn pod_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let second = 10 + (std::process::id() % 200) as u8;
    Ipv4Addr::new(127, second, (n / 250) as u8, (n % 250 + 1) as u8)
}
