//! The capture as rules: what `init` puts into meshd's four nat chains for one address
//! family, each rule with the flag it comes from (so a refused rule can be explained).
//!
//! ```text
//! PREROUTING -p tcp → MESHD_INBOUND:  the agent's health port         → RETURN
//!                                     --exclude-inbound-ports         → RETURN
//!                                     --include-inbound-ports (*)     → MESHD_IN_REDIRECT → REDIRECT --inbound-port
//! OUTPUT -p tcp     → MESHD_OUTPUT:   proxy uid/gid over lo, not to the loopback address
//!                                       (Envoy calling its own pod)    → MESHD_IN_REDIRECT
//!                                     anyone else over lo             → RETURN
//!                                     proxy uid/gid                   → RETURN
//!                                     to the loopback address         → RETURN
//!                                     --exclude-outbound-ports/-ip-ranges → RETURN
//!                                     --include-outbound-ip-ranges (*) → MESHD_REDIRECT → REDIRECT --outbound-port
//! ```
//!
//! This is Istio's REDIRECT layout. Envoy's own connections over `lo` to a pod address
//! (a pod calling its own Service or pod IP, which the outbound listener sent on to that
//! address) are sent to the inbound listener, so a self-call still passes the inbound
//! mTLS and RBAC chain. The capture ports themselves are not exempt from inbound
//! capture: a connection from outside to 15001 or 15006 lands on the inbound listener
//! and meets its policy like any other (exempting 15001 would hand an outside caller the
//! pod's outbound listener, past the inbound checks).

use std::fmt;

use meshd_sidecar::capture::{self, CidrList, PortList, Selection};

pub const INBOUND_CHAIN: &str = "MESHD_INBOUND";
pub const IN_REDIRECT_CHAIN: &str = "MESHD_IN_REDIRECT";
pub const OUTPUT_CHAIN: &str = "MESHD_OUTPUT";
pub const REDIRECT_CHAIN: &str = "MESHD_REDIRECT";

/// meshd's chains in the nat table: everything `init` owns besides the two jumps.
pub const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// The one jump into meshd's chains from each built-in chain, as `iptables-save`
/// prints it (so that an existing jump is recognised by its text).
pub const JUMPS: [(&str, &str); 2] = [
    ("PREROUTING", "-p tcp -j MESHD_INBOUND"),
    ("OUTPUT", "-p tcp -j MESHD_OUTPUT"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The loopback address Envoy's and the app's loopback traffic goes to.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// `iptables` or `ip6tables`: the tools' common prefix.
    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn is_v4(self) -> bool {
        self == Family::V4
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Where a rule comes from, for the error that names a refused rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A flag of `init` (without `--`), possibly set from a pod annotation.
    Flag(&'static str),
    /// Part of the capture itself.
    Builtin(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => {
                write!(f, "from --{flag}")?;
                if let Some(annotation) = capture::annotation_for_flag(flag) {
                    write!(f, " (pod annotation {annotation})")?;
                }
                Ok(())
            }
            Origin::Builtin(what) => f.write_str(what),
        }
    }
}

/// One rule of meshd's chains: `-A <chain> <spec>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: String,
    pub origin: Origin,
}

/// The capture `init` programs, its flags validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub exclude_outbound_ports: PortList,
    pub exclude_outbound_ip_ranges: CidrList,
    pub include_outbound_ip_ranges: Selection<CidrList>,
    pub exclude_inbound_ports: PortList,
    pub include_inbound_ports: Selection<PortList>,
}

impl Capture {
    /// meshd's chains for one family, chain by chain, in order.
    pub fn rules(&self, family: Family) -> Vec<Rule> {
        let mut rules = Vec::new();
        let mut add = |chain, spec: String, origin| {
            rules.push(Rule {
                chain,
                spec,
                origin,
            })
        };

        add(
            INBOUND_CHAIN,
            format!("-p tcp --dport {} -j RETURN", capture::AGENT_HEALTH_PORT),
            Origin::Builtin("the agent's health port, for the kubelet's probes"),
        );
        for port in &self.exclude_inbound_ports.0 {
            let origin = Origin::Flag("exclude-inbound-ports");
            add(
                INBOUND_CHAIN,
                format!("-p tcp --dport {port} -j RETURN"),
                origin,
            );
        }
        let origin = Origin::Flag("include-inbound-ports");
        match &self.include_inbound_ports {
            Selection::All => add(
                INBOUND_CHAIN,
                format!("-p tcp -j {IN_REDIRECT_CHAIN}"),
                origin,
            ),
            Selection::Only(ports) => {
                for port in &ports.0 {
                    let spec = format!("-p tcp --dport {port} -j {IN_REDIRECT_CHAIN}");
                    add(INBOUND_CHAIN, spec, origin);
                }
            }
        }
        add(
            IN_REDIRECT_CHAIN,
            format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port),
            Origin::Flag("inbound-port"),
        );

        if family == Family::V4 {
            add(
                OUTPUT_CHAIN,
                format!(
                    "-o lo -s {}/32 -j RETURN",
                    capture::INBOUND_PASSTHROUGH_SOURCE
                ),
                Origin::Builtin("Envoy handing a port no Service names on to the app"),
            );
        }
        let lo = family.loopback();
        for (owner, id, flag) in [
            ("uid", self.proxy_uid, "proxy-uid"),
            ("gid", self.proxy_gid, "proxy-gid"),
        ] {
            let origin = Origin::Flag(flag);
            let spec =
                format!("-o lo ! -d {lo} -m owner --{owner}-owner {id} -j {IN_REDIRECT_CHAIN}");
            add(OUTPUT_CHAIN, spec, origin);
            let spec = format!("-o lo -m owner ! --{owner}-owner {id} -j RETURN");
            add(OUTPUT_CHAIN, spec, origin);
            add(
                OUTPUT_CHAIN,
                format!("-m owner --{owner}-owner {id} -j RETURN"),
                origin,
            );
        }
        add(
            OUTPUT_CHAIN,
            format!("-d {lo} -j RETURN"),
            Origin::Builtin("loopback destinations"),
        );
        for port in &self.exclude_outbound_ports.0 {
            let origin = Origin::Flag("exclude-outbound-ports");
            add(
                OUTPUT_CHAIN,
                format!("-p tcp --dport {port} -j RETURN"),
                origin,
            );
        }
        for range in self.exclude_outbound_ip_ranges.of_family(family.is_v4()) {
            let origin = Origin::Flag("exclude-outbound-ip-ranges");
            add(OUTPUT_CHAIN, format!("-d {range} -j RETURN"), origin);
        }
        let origin = Origin::Flag("include-outbound-ip-ranges");
        match &self.include_outbound_ip_ranges {
            Selection::All => add(OUTPUT_CHAIN, format!("-j {REDIRECT_CHAIN}"), origin),
            Selection::Only(ranges) => {
                for range in ranges.of_family(family.is_v4()) {
                    add(
                        OUTPUT_CHAIN,
                        format!("-d {range} -j {REDIRECT_CHAIN}"),
                        origin,
                    );
                }
            }
        }
        add(
            REDIRECT_CHAIN,
            format!("-p tcp -j REDIRECT --to-ports {}", self.outbound_port),
            Origin::Flag("outbound-port"),
        );
        rules
    }
}

/// The capture `init` programs without flags, for the init modules' tests.
#[cfg(test)]
pub(super) fn default_capture() -> Capture {
    Capture {
        outbound_port: 15001,
        inbound_port: 15006,
        proxy_uid: 1337,
        proxy_gid: 1337,
        exclude_outbound_ports: PortList::default(),
        exclude_outbound_ip_ranges: CidrList::default(),
        include_outbound_ip_ranges: Selection::All,
        exclude_inbound_ports: PortList::default(),
        include_inbound_ports: Selection::All,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture() -> Capture {
        default_capture()
    }

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules
            .iter()
            .map(|r| format!("-A {} {}", r.chain, r.spec))
            .collect()
    }

    #[test]
    fn the_default_capture_redirects_all_tcp_but_the_proxys_and_loopback() {
        assert_eq!(
            lines(&capture().rules(Family::V4)),
            [
                "-A MESHD_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A MESHD_INBOUND -p tcp -j MESHD_IN_REDIRECT",
                "-A MESHD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A MESHD_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
                "-A MESHD_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j MESHD_IN_REDIRECT",
                "-A MESHD_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A MESHD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MESHD_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j MESHD_IN_REDIRECT",
                "-A MESHD_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
                "-A MESHD_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A MESHD_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A MESHD_OUTPUT -j MESHD_REDIRECT",
                "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        let v6 = lines(&capture().rules(Family::V6));
        assert!(
            v6.contains(&"-A MESHD_OUTPUT -d ::1/128 -j RETURN".to_string()),
            "{v6:#?}"
        );
        assert!(!v6.iter().any(|l| l.contains("127.0.0.1")), "{v6:#?}");
    }

    #[test]
    fn exclusions_come_before_the_redirect_and_each_family_gets_its_ranges() {
        let capture = Capture {
            outbound_port: 16001,
            inbound_port: 16006,
            proxy_uid: 1500,
            proxy_gid: 1600,
            exclude_outbound_ports: "5432,6379".parse().unwrap(),
            exclude_outbound_ip_ranges: "169.254.169.254, fd00:ec2::254".parse().unwrap(),
            include_outbound_ip_ranges: "10.96.0.0/12,fd00:96::/64".parse().unwrap(),
            exclude_inbound_ports: "9090".parse().unwrap(),
            include_inbound_ports: "8080,9090".parse().unwrap(),
        };
        let v4 = lines(&capture.rules(Family::V4));
        assert_eq!(
            v4,
            [
                "-A MESHD_INBOUND -p tcp --dport 15020 -j RETURN",
                "-A MESHD_INBOUND -p tcp --dport 9090 -j RETURN",
                "-A MESHD_INBOUND -p tcp --dport 8080 -j MESHD_IN_REDIRECT",
                "-A MESHD_INBOUND -p tcp --dport 9090 -j MESHD_IN_REDIRECT",
                "-A MESHD_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
                "-A MESHD_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
                "-A MESHD_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1500 -j MESHD_IN_REDIRECT",
                "-A MESHD_OUTPUT -o lo -m owner ! --uid-owner 1500 -j RETURN",
                "-A MESHD_OUTPUT -m owner --uid-owner 1500 -j RETURN",
                "-A MESHD_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1600 -j MESHD_IN_REDIRECT",
                "-A MESHD_OUTPUT -o lo -m owner ! --gid-owner 1600 -j RETURN",
                "-A MESHD_OUTPUT -m owner --gid-owner 1600 -j RETURN",
                "-A MESHD_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A MESHD_OUTPUT -p tcp --dport 5432 -j RETURN",
                "-A MESHD_OUTPUT -p tcp --dport 6379 -j RETURN",
                "-A MESHD_OUTPUT -d 169.254.169.254/32 -j RETURN",
                "-A MESHD_OUTPUT -d 10.96.0.0/12 -j MESHD_REDIRECT",
                "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            ]
        );
        let v6 = lines(&capture.rules(Family::V6));
        assert!(v6.contains(&"-A MESHD_OUTPUT -d fd00:ec2::254/128 -j RETURN".to_string()));
        assert!(v6.contains(&"-A MESHD_OUTPUT -d fd00:96::/64 -j MESHD_REDIRECT".to_string()));
        assert!(
            !v6.iter()
                .any(|l| l.contains("10.96.0.0") || l.contains("169.254"))
        );
    }

    #[test]
    fn an_empty_include_list_captures_nothing_that_way() {
        let capture = Capture {
            include_outbound_ip_ranges: Selection::Only(CidrList::default()),
            include_inbound_ports: Selection::Only(PortList::default()),
            ..capture()
        };
        let rules = lines(&capture.rules(Family::V4));
        assert!(
            !rules.iter().any(|l| l.ends_with("-j MESHD_REDIRECT")),
            "{rules:#?}"
        );
        assert!(
            !rules
                .iter()
                .any(|l| l.starts_with("-A MESHD_INBOUND") && l.ends_with("-j MESHD_IN_REDIRECT")),
            "{rules:#?}"
        );
    }

    #[test]
    fn a_rule_names_its_flag_and_the_annotation_behind_it() {
        let capture = Capture {
            exclude_outbound_ip_ranges: "10.0.0.0/8".parse().unwrap(),
            ..capture()
        };
        let rules = capture.rules(Family::V4);
        let rule = rules
            .iter()
            .find(|r| r.spec == "-d 10.0.0.0/8 -j RETURN")
            .unwrap();
        assert_eq!(
            rule.origin.to_string(),
            "from --exclude-outbound-ip-ranges (pod annotation meshd.io/exclude-outbound-ip-ranges)"
        );
        let uid = rules
            .iter()
            .find(|r| r.spec.contains("--uid-owner"))
            .unwrap();
        assert_eq!(uid.origin.to_string(), "from --proxy-uid");
    }
}
