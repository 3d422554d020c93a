//! Transparent capture, the part both sides of it share: the ports Envoy and the agent
//! listen on in a captured pod, the pod annotations that tune the capture, and the one
//! parser of their values.
//!
//! `meshd-agent init` (the injected init container) redirects the pod's TCP to
//! [`OUTBOUND_PORT`] and [`INBOUND_PORT`], leaving out the proxy's own traffic
//! ([`PROXY_UID`]) and the agent's [`AGENT_HEALTH_PORT`]. The injector reads the pod's
//! annotations ([`ANNOTATIONS`]) and turns them into `init`'s arguments with
//! [`init_args`]; the agent parses its flags with the same types ([`PortList`],
//! [`CidrList`], [`Selection`]), so a value the injector accepts is one `init` accepts,
//! and an error names the annotation on one side and the flag on the other.
//!
//! Value syntax, for annotations and flags alike: a comma-separated list (spaces
//! around entries are ignored, an empty string is an empty list). A port is 1–65535.
//! An IP range is `address/prefix` or a bare address (one host), IPv4 or IPv6 in the
//! same list (each ip(6)tables table takes its own family); host bits must be zero and
//! IPv4-mapped IPv6 ranges (`::ffff:a.b.c.d/n`, which ip6tables never sees) are refused.
//! The include lists also take `*`, alone: everything.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Envoy's outbound virtual listener: every captured outbound connection.
pub const OUTBOUND_PORT: u16 = 15001;
/// Envoy's inbound virtual listener: every captured inbound connection.
pub const INBOUND_PORT: u16 = 15006;
/// The agent's health port (`/healthz/ready`, the app's probes under
/// [`crate::probes::PATH_PREFIX`]); never captured, so the kubelet's plaintext probes
/// reach it.
pub const AGENT_HEALTH_PORT: u16 = 15020;
/// The uid (and by default gid) Envoy runs as; its connections are never captured.
pub const PROXY_UID: u32 = 1337;
/// The source address from which Envoy hands an inbound connection for a port no
/// Service names on to the app at its original destination; init exempts it from
/// capture, so the connection reaches the app instead of Envoy's inbound port again.
pub const INBOUND_PASSTHROUGH_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

/// `meshd.io/exclude-outbound-ports`: outbound TCP to these ports bypasses Envoy.
pub const EXCLUDE_OUTBOUND_PORTS_ANNOTATION: &str = "meshd.io/exclude-outbound-ports";
/// `meshd.io/exclude-outbound-ip-ranges`: outbound TCP to these ranges bypasses Envoy.
pub const EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION: &str = "meshd.io/exclude-outbound-ip-ranges";
/// `meshd.io/include-outbound-ip-ranges`: only outbound TCP to these ranges is captured
/// (`*`, the default: all).
pub const INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION: &str = "meshd.io/include-outbound-ip-ranges";
/// `meshd.io/exclude-inbound-ports`: inbound TCP to these ports bypasses Envoy.
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "meshd.io/exclude-inbound-ports";

/// What kind of value an annotation (and its flag) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A [`PortList`].
    Ports,
    /// A [`CidrList`].
    IpRanges,
    /// A [`Selection`] of a [`CidrList`]: `*` or ranges.
    IpRangesOrAll,
}

/// A capture annotation and the `meshd-agent init` flag it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Annotation {
    pub name: &'static str,
    /// The flag, without its leading `--`.
    pub flag: &'static str,
    pub kind: ValueKind,
}

/// Every annotation [`init_args`] reads, in the order its arguments come out.
pub const ANNOTATIONS: [Annotation; 4] = [
    Annotation {
        name: EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
        flag: "exclude-outbound-ports",
        kind: ValueKind::Ports,
    },
    Annotation {
        name: EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
        flag: "exclude-outbound-ip-ranges",
        kind: ValueKind::IpRanges,
    },
    Annotation {
        name: INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
        flag: "include-outbound-ip-ranges",
        kind: ValueKind::IpRangesOrAll,
    },
    Annotation {
        name: EXCLUDE_INBOUND_PORTS_ANNOTATION,
        flag: "exclude-inbound-ports",
        kind: ValueKind::Ports,
    },
];

/// The annotation a flag (without `--`) is set from, if any.
pub fn annotation_for_flag(flag: &str) -> Option<&'static str> {
    ANNOTATIONS.iter().find(|a| a.flag == flag).map(|a| a.name)
}

/// A pod annotation whose value is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod annotation {annotation} {value:?}: {error}")]
pub struct CaptureError {
    pub annotation: &'static str,
    pub value: String,
    pub error: ListError,
}

/// `meshd-agent init`'s arguments for a pod with these annotations: one
/// `--<flag>=<value>` per capture annotation present (values in canonical form, so
/// an empty value stays an argument: an empty include list captures nothing). Other
/// annotations are ignored. The result goes after `meshd-agent init`.
pub fn init_args(annotations: &BTreeMap<String, String>) -> Result<Vec<String>, CaptureError> {
    let mut args = Vec::new();
    for annotation in &ANNOTATIONS {
        let Some(value) = annotations.get(annotation.name) else {
            continue;
        };
        let canonical = match annotation.kind {
            ValueKind::Ports => value.parse::<PortList>().map(|v| v.to_string()),
            ValueKind::IpRanges => value.parse::<CidrList>().map(|v| v.to_string()),
            ValueKind::IpRangesOrAll => value.parse::<Selection<CidrList>>().map(|v| v.to_string()),
        }
        .map_err(|error| CaptureError {
            annotation: annotation.name,
            value: value.clone(),
            error,
        })?;
        args.push(format!("--{}={canonical}", annotation.flag));
    }
    Ok(args)
}

/// What is wrong with one entry of a list (the caller names the annotation or flag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
    #[error("{0:?} is not an IP range (address/prefix or an address, e.g. 10.0.0.0/8, fd00::/8)")]
    NotAnIpRange(String),
    #[error("{entry:?}: the prefix of an {family} range is at most {max}")]
    PrefixTooLong {
        entry: String,
        family: &'static str,
        max: u8,
    },
    #[error("{entry:?} has host bits set: the range is {network}")]
    HostBits { entry: String, network: Cidr },
    #[error(
        "{entry:?} is an IPv4-mapped IPv6 range, which ip6tables never sees: write it as IPv4 ({ipv4})"
    )]
    Ipv4Mapped { entry: String, ipv4: Cidr },
    #[error("an empty entry (two commas in a row, or one at an end)")]
    EmptyEntry,
    #[error("\"*\" (everything) stands alone, not in a list")]
    Wildcard,
}

/// The entries of a comma-separated list; an empty (or blank) string has none.
fn entries(list: &str) -> Result<Vec<&str>, ListError> {
    if list.trim().is_empty() {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(|entry| match entry.trim() {
            "" => Err(ListError::EmptyEntry),
            "*" => Err(ListError::Wildcard),
            entry => Ok(entry),
        })
        .collect()
}

/// A comma-separated list of TCP ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl FromStr for PortList {
    type Err = ListError;
    fn from_str(list: &str) -> Result<Self, ListError> {
        entries(list)?
            .into_iter()
            .map(|entry| match entry.parse::<u16>() {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(ListError::NotAPort(entry.to_string())),
            })
            .collect::<Result<_, _>>()
            .map(PortList)
    }
}

impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        join(f, &self.0)
    }
}

/// An IP range: a network address and its prefix length (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl FromStr for Cidr {
    type Err = ListError;
    fn from_str(entry: &str) -> Result<Self, ListError> {
        let not_a_range = || ListError::NotAnIpRange(entry.to_string());
        let (addr, prefix) = match entry.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (entry, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| not_a_range())?;
        let (family, max) = match addr {
            IpAddr::V4(_) => ("IPv4", 32),
            IpAddr::V6(_) => ("IPv6", 128),
        };
        let prefix_len = match prefix {
            // Digits only: `u8::from_str` would also take "+8".
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().unwrap_or(u8::MAX)
            }
            Some(_) => return Err(not_a_range()),
            None => max,
        };
        if prefix_len > max {
            return Err(ListError::PrefixTooLong {
                entry: entry.to_string(),
                family,
                max,
            });
        }
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && let Some(len) = prefix_len.checked_sub(96)
        {
            return Err(ListError::Ipv4Mapped {
                entry: entry.to_string(),
                ipv4: Cidr {
                    addr: network_of(IpAddr::V4(v4), len),
                    prefix_len: len,
                },
            });
        }
        let network = Cidr {
            addr: network_of(addr, prefix_len),
            prefix_len,
        };
        if network.addr != addr {
            return Err(ListError::HostBits {
                entry: entry.to_string(),
                network,
            });
        }
        Ok(network)
    }
}

fn network_of(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A comma-separated list of IP ranges, both families mixed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl CidrList {
    /// The ranges of one family, in the order given.
    pub fn of_family(&self, ipv4: bool) -> impl Iterator<Item = &Cidr> {
        self.0.iter().filter(move |c| c.is_ipv4() == ipv4)
    }
}

impl FromStr for CidrList {
    type Err = ListError;
    fn from_str(list: &str) -> Result<Self, ListError> {
        entries(list)?
            .into_iter()
            .map(Cidr::from_str)
            .collect::<Result<_, _>>()
            .map(CidrList)
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        join(f, &self.0)
    }
}

/// `*` (everything) or a list (which may be empty: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<L> {
    All,
    Only(L),
}

impl<L: FromStr<Err = ListError>> FromStr for Selection<L> {
    type Err = ListError;
    fn from_str(s: &str) -> Result<Self, ListError> {
        if s.trim() == "*" {
            Ok(Selection::All)
        } else {
            s.parse().map(Selection::Only)
        }
    }
}

impl<L: fmt::Display> fmt::Display for Selection<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::All => f.write_str("*"),
            Selection::Only(list) => list.fmt(f),
        }
    }
}

fn join<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        item.fmt(f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_become_init_arguments_in_canonical_form() {
        let args = init_args(&annotations(&[
            ("meshd.io/capture", "transparent"),
            (
                INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                " 10.96.0.0/12, fd00::/8 ",
            ),
            (EXCLUDE_INBOUND_PORTS_ANNOTATION, "9090"),
            (EXCLUDE_OUTBOUND_PORTS_ANNOTATION, "5432, 6379"),
            (EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION, "169.254.169.254"),
        ]))
        .unwrap();
        assert_eq!(
            args,
            [
                "--exclude-outbound-ports=5432,6379",
                "--exclude-outbound-ip-ranges=169.254.169.254/32",
                "--include-outbound-ip-ranges=10.96.0.0/12,fd00::/8",
                "--exclude-inbound-ports=9090",
            ]
        );
    }

    #[test]
    fn no_capture_annotation_no_arguments_and_empty_values_stay_arguments() {
        assert!(init_args(&BTreeMap::new()).unwrap().is_empty());
        let args = init_args(&annotations(&[
            (INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION, ""),
            (EXCLUDE_OUTBOUND_PORTS_ANNOTATION, " "),
        ]))
        .unwrap();
        assert_eq!(
            args,
            ["--exclude-outbound-ports=", "--include-outbound-ip-ranges="]
        );
        let all = init_args(&annotations(&[(
            INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
            "*",
        )]))
        .unwrap();
        assert_eq!(all, ["--include-outbound-ip-ranges=*"]);
    }

    #[test]
    fn a_bad_annotation_value_is_named_with_the_annotation_and_the_entry() {
        let cases = [
            (
                EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
                "5432,x",
                "\"x\" is not a port",
            ),
            (EXCLUDE_INBOUND_PORTS_ANNOTATION, "0", "\"0\" is not a port"),
            (
                EXCLUDE_INBOUND_PORTS_ANNOTATION,
                "70000",
                "\"70000\" is not a port",
            ),
            (
                EXCLUDE_INBOUND_PORTS_ANNOTATION,
                "80,,443",
                "an empty entry",
            ),
            (EXCLUDE_OUTBOUND_PORTS_ANNOTATION, "*", "stands alone"),
            (
                EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "10.0.0.0/33",
                "at most 32",
            ),
            (
                EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "fd00::/129",
                "at most 128",
            ),
            (
                EXCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "10.0.0.1/8",
                "host bits set: the range is 10.0.0.0/8",
            ),
            (
                INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "::ffff:10.0.0.0/104",
                "write it as IPv4 (10.0.0.0/8)",
            ),
            (
                INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "web.shop",
                "not an IP range",
            ),
            (
                INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "10.0.0.0/+8",
                "not an IP range",
            ),
            (
                INCLUDE_OUTBOUND_IP_RANGES_ANNOTATION,
                "*,10.0.0.0/8",
                "stands alone",
            ),
        ];
        for (annotation, value, reason) in cases {
            let e = init_args(&annotations(&[(annotation, value)])).unwrap_err();
            assert_eq!(e.annotation, annotation);
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("pod annotation {annotation} {value:?}: ")),
                "{text}"
            );
            assert!(text.contains(reason), "{value}: {text}");
        }
    }

    #[test]
    fn a_peer_supplied_value_is_escaped_in_the_error() {
        let e = init_args(&annotations(&[(
            EXCLUDE_INBOUND_PORTS_ANNOTATION,
            "80\n\u{1b}[31m",
        )]))
        .unwrap_err();
        let text = e.to_string();
        assert!(!text.contains('\n') && !text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn ranges_keep_both_families_apart() {
        let list: CidrList = "10.0.0.0/8, fd00::/8, 192.0.2.7, 2001:db8::1"
            .parse()
            .unwrap();
        let v4: Vec<String> = list.of_family(true).map(|c| c.to_string()).collect();
        let v6: Vec<String> = list.of_family(false).map(|c| c.to_string()).collect();
        assert_eq!(v4, ["10.0.0.0/8", "192.0.2.7/32"]);
        assert_eq!(v6, ["fd00::/8", "2001:db8::1/128"]);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
        assert_eq!("::/0".parse::<Cidr>().unwrap().to_string(), "::/0");
    }

    #[test]
    fn every_annotation_names_its_flag() {
        for a in &ANNOTATIONS {
            assert_eq!(annotation_for_flag(a.flag), Some(a.name));
            assert_eq!(a.name.strip_prefix("meshd.io/"), Some(a.flag));
        }
        assert_eq!(annotation_for_flag("proxy-uid"), None);
    }
}
