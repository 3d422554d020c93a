//! Whether the pod speaks IPv6 beyond itself: an address that is neither loopback nor
//! link-local on an interface other than `lo`, as `/proc/net/if_inet6` lists the
//! addresses of the network namespace the agent runs in. Only then does `init` program
//! ip6tables too (a link-local address alone reaches no Service).

use std::net::Ipv6Addr;

/// The kernel's list of this network namespace's IPv6 addresses.
const IF_INET6: &str = "/proc/net/if_inet6";

/// Whether the kernel has IPv6 at all here (the file is missing when it is disabled).
pub fn enabled() -> bool {
    std::path::Path::new(IF_INET6).exists()
}

/// Whether this network namespace has an IPv6 address that reaches beyond the pod.
pub fn routable() -> std::io::Result<bool> {
    match std::fs::read_to_string(IF_INET6) {
        Ok(list) => Ok(has_routable(&list)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// One line per address: `<32 hex digits> <ifindex> <prefix len> <scope> <flags> <name>`.
fn has_routable(if_inet6: &str) -> bool {
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(hex), Some(name)) = (fields.first(), fields.get(5)) else {
            return false;
        };
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            return false;
        };
        let addr = Ipv6Addr::from(bits);
        *name != "lo" && !addr.is_loopback() && !addr.is_unicast_link_local()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_address_beyond_loopback_and_link_local_counts() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link_local = "fe80000000000000a0b1c2fffed3e4f5 02 40 20 80     eth0\n";
        let global = "fd000000000000000000000000000002 02 40 00 80     eth0\n";
        assert!(!has_routable(""));
        assert!(!has_routable(lo));
        assert!(!has_routable(&format!("{lo}{link_local}")));
        assert!(has_routable(&format!("{lo}{link_local}{global}")));
        // An address on lo itself reaches nothing outside the pod either.
        assert!(!has_routable(
            "fd000000000000000000000000000009 01 80 00 80       lo\n"
        ));
        assert!(!has_routable("garbage\n"));
    }
}
