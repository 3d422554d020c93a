//! `meshd-agent init`: transparent capture, programmed once into the pod's network
//! namespace by the injected init container (root, NET_ADMIN, before any other
//! container starts).
//!
//! For each address family the pod has (IPv4 always; IPv6 when [`inet6`] finds an
//! address beyond loopback and link-local) it picks the iptables backend
//! ([`backend`]), reads the nat table with `-save`, and applies ONE
//! `iptables-restore --noflush` transaction ([`nat`]) that rewrites meshd's four chains
//! with the capture's rules ([`rules`]) and makes sure exactly one jump leads into them
//! from `PREROUTING` and from `OUTPUT`. One transaction per family is all or nothing: a
//! refused rule changes nothing, and the error names the line, its rule and the flag
//! (and pod annotation) it came from. IPv6 goes first; if IPv4 is then refused, IPv6 is
//! rolled back to what it was, so a failed init leaves the namespace as it found it.
//!
//! `--cleanup` removes meshd's jumps and chains and nothing else (a second cleanup
//! finds nothing to do). `--dry-run` prints the transactions instead of applying them
//! (without root it cannot read the current rules and prints them as for a fresh
//! namespace). The transactions go to stdout (applied or not), one line per family
//! saying what was done and with which backend to stderr.

pub mod backend;
mod inet6;
mod nat;
mod rules;

use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::cli::InitArgs;
use backend::Backend;
use nat::{NatTable, Script};
use rules::{Capture, Family};

pub fn init(args: &InitArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd-agent init: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A family whose transaction went through, with what it replaced.
struct Applied {
    family: Family,
    backend: Backend,
    before: NatTable,
}

fn run(args: &InitArgs) -> anyhow::Result<()> {
    let capture = capture(args)?;
    let mut families = Vec::new();
    let ipv6 = if args.cleanup {
        inet6::enabled()
    } else {
        inet6::routable().context("cannot read /proc/net/if_inet6")?
    };
    if ipv6 {
        families.push(Family::V6);
    } else if args.cleanup {
        status(Family::V6, "left alone: IPv6 is disabled here");
    } else {
        status(
            Family::V6,
            "left alone: no IPv6 address beyond loopback and link-local",
        );
    }
    families.push(Family::V4);

    let mut applied: Vec<Applied> = Vec::new();
    for family in families {
        match program(family, args, &capture) {
            Ok(Some(done)) => applied.push(done),
            Ok(None) => {}
            Err(e) => {
                let mut message = format!("{e:#}");
                for done in applied.iter().rev() {
                    message.push_str(&format!("; {}", roll_back(done)));
                }
                bail!(message);
            }
        }
    }
    Ok(())
}

/// One family's transaction: read, build, print, apply (unless a dry run). `Some` if
/// it changed the namespace.
fn program(family: Family, args: &InitArgs, capture: &Capture) -> anyhow::Result<Option<Applied>> {
    let (backend, saved) =
        backend::detect(family, args.iptables_backend).map_err(anyhow::Error::msg)?;
    let before = match saved {
        Ok(save) => NatTable::parse(&save),
        Err(e) if args.dry_run => {
            out(&format!(
                "# {family}: cannot read the current rules ({e}); as for a fresh namespace\n"
            ));
            NatTable::default()
        }
        Err(e) => bail!("{family}: cannot read the current rules: {e}"),
    };
    let script = if args.cleanup {
        nat::cleanup(&before)
    } else {
        Some(nat::apply(&before, &capture.rules(family)))
    };
    let Some(script) = script else {
        status(family, &format!("nothing of meshd's to remove; {backend}"));
        return Ok(None);
    };
    let restore = backend.restore_program();
    out(&format!(
        "# {family}: {restore} --noflush\n{}",
        script.text()
    ));
    if args.dry_run {
        status(family, &format!("dry run, nothing applied; {backend}"));
        return Ok(None);
    }
    if let Err(stderr) = backend.restore(&script.text()) {
        bail!(
            "{family}: the transaction was refused and nothing was changed ({restore}): {}",
            script.explain(&stderr)
        );
    }
    let what = if args.cleanup {
        "removed meshd's jumps and chains".to_string()
    } else {
        format!("applied {} rules in one transaction", script.appended())
    };
    status(family, &format!("{what}; {backend}"));
    Ok(Some(Applied {
        family,
        backend,
        before,
    }))
}

/// Takes an earlier family back to what it was; says how that went.
fn roll_back(done: &Applied) -> String {
    let family = done.family;
    let now = match done.backend.save() {
        Ok(save) => NatTable::parse(&save),
        Err(e) => return format!("{family} was applied and cannot be rolled back: {e}"),
    };
    let Some(script): Option<Script> = nat::roll_back(&done.before, &now) else {
        return format!("{family} is as it was");
    };
    match done.backend.restore(&script.text()) {
        Ok(()) => format!("{family} was rolled back to what it was"),
        Err(e) => format!(
            "{family} was applied and its roll-back refused: {}",
            script.explain(&e)
        ),
    }
}

/// The transactions, on stdout. A reader that went away (`| head`) stops nothing.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn status(family: Family, what: &str) {
    eprintln!("meshd-agent init: {family}: {what}");
}

/// The flags as one capture; what clap cannot check alone.
fn capture(args: &InitArgs) -> anyhow::Result<Capture> {
    if args.outbound_port == args.inbound_port {
        bail!(
            "--outbound-port and --inbound-port are both {}: Envoy's two listeners need two ports",
            args.inbound_port
        );
    }
    Ok(Capture {
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        proxy_uid: args.proxy_uid,
        proxy_gid: args.proxy_gid.unwrap_or(args.proxy_uid),
        exclude_outbound_ports: args.exclude_outbound_ports.clone().unwrap_or_default(),
        exclude_outbound_ip_ranges: args.exclude_outbound_ip_ranges.clone().unwrap_or_default(),
        include_outbound_ip_ranges: args.include_outbound_ip_ranges.clone(),
        exclude_inbound_ports: args.exclude_inbound_ports.clone().unwrap_or_default(),
        include_inbound_ports: args.include_inbound_ports.clone(),
    })
}
