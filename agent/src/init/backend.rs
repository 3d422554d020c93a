//! Which iptables to use (nft or legacy) and running its `-save` and `-restore`.
//!
//! Both backends can be installed and both can hold rules, and rules in one are
//! invisible to the other, so `auto` picks the one already in use in this network
//! namespace, as Istio does: the one that holds meshd's chains (so that a second run
//! and `--cleanup` find the first run's rules), else the legacy one if
//! `iptables-legacy-save` shows rules, else the nft one if `iptables-nft-save` does,
//! else the image's default `iptables` (whichever its alternatives link names).
//! Only `-save` without `-t` is run to look: it lists existing tables and creates
//! none (the legacy `-t nat` would instantiate an empty table).

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

use super::nat::NatTable;
use super::rules::Family;

/// `--iptables-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The one in use here, else the default `iptables`.
    Auto,
    Nft,
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nft,
    Legacy,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Nft => "nft",
            Kind::Legacy => "legacy",
        })
    }
}

/// The chosen tools for one family, and why they were chosen.
#[derive(Debug, Clone)]
pub struct Backend {
    pub kind: Kind,
    /// `iptables-nft`, `ip6tables-legacy`, `iptables`, ...: `-save` and `-restore` follow.
    tool: String,
    why: String,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} backend: {} ({})",
            self.kind,
            self.restore_program(),
            self.why
        )
    }
}

/// A `-save` run's output, or why there is none.
pub type Saved = Result<String, String>;

impl Backend {
    pub fn restore_program(&self) -> String {
        format!("{}-restore", self.tool)
    }

    fn save_program(&self) -> String {
        format!("{}-save", self.tool)
    }

    /// Every table this backend holds here, as `-save` prints it.
    pub fn save(&self) -> Saved {
        save(&self.save_program())
    }

    /// Applies `script` as one `--noflush` transaction; on refusal, iptables-restore's
    /// stderr.
    pub fn restore(&self, script: &str) -> Result<(), String> {
        let program = self.restore_program();
        let mut command = Command::new(&program);
        command.arg("--noflush");
        if self.kind == Kind::Legacy {
            // Legacy takes a lock shared by everything on the host's filesystem.
            command.arg("--wait=10");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(script.as_bytes()));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            if let Some(Err(e)) = written {
                return Err(format!("{program} exited before reading its input: {e}"));
            }
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr.push_str(&String::from_utf8_lossy(&out.stdout));
        if stderr.trim().is_empty() {
            stderr = format!("{program} {}", out.status);
        }
        Err(stderr)
    }
}

fn save(program: &str) -> Saved {
    let out = Command::new(program)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{program} {}: {}", out.status, stderr.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The backend to use for `family`, and what its `-save` shows now.
pub fn detect(family: Family, choice: Choice) -> Result<(Backend, Saved), String> {
    let tool = family.tool();
    let forced = |kind: Kind| {
        let backend = Backend {
            kind,
            tool: format!("{tool}-{kind}"),
            why: "--iptables-backend".to_string(),
        };
        let saved = backend.save();
        (backend, saved)
    };
    match choice {
        Choice::Nft => return Ok(forced(Kind::Nft)),
        Choice::Legacy => return Ok(forced(Kind::Legacy)),
        Choice::Auto => {}
    }
    let legacy = save(&format!("{tool}-legacy-save"));
    let nft = save(&format!("{tool}-nft-save"));
    if let Some((kind, why)) = in_use(legacy.as_deref().ok(), nft.as_deref().ok()) {
        let saved = match kind {
            Kind::Legacy => legacy,
            Kind::Nft => nft,
        };
        let backend = Backend {
            kind,
            tool: format!("{tool}-{kind}"),
            why: format!("auto: {why}"),
        };
        return Ok((backend, saved));
    }
    let version = Command::new(format!("{tool}-restore"))
        .arg("--version")
        .output()
        .map_err(|e| {
            format!("no {tool}-legacy or {tool}-nft in use and cannot run {tool}-restore: {e}")
        })?;
    let kind = if String::from_utf8_lossy(&version.stdout).contains("nf_tables") {
        Kind::Nft
    } else {
        Kind::Legacy
    };
    let backend = Backend {
        kind,
        tool: tool.to_string(),
        why: "auto: no rules in either backend yet, the default".to_string(),
    };
    let saved = backend.save();
    Ok((backend, saved))
}

/// Which backend is in use, given what each `-save` printed (`None`: not there or
/// not readable).
fn in_use(legacy: Option<&str>, nft: Option<&str>) -> Option<(Kind, &'static str)> {
    let holds_meshd = |save: Option<&str>| save.is_some_and(|s| NatTable::parse(s).has_meshd());
    let has_rules = |save: Option<&str>| {
        save.is_some_and(|s| s.lines().any(|l| l.trim_start().starts_with("-A ")))
    };
    if holds_meshd(legacy) {
        Some((Kind::Legacy, "it holds meshd's chains"))
    } else if holds_meshd(nft) {
        Some((Kind::Nft, "it holds meshd's chains"))
    } else if has_rules(legacy) {
        Some((Kind::Legacy, "it holds rules"))
    } else if has_rules(nft) {
        Some((Kind::Nft, "it holds rules"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
    const RULES: &str =
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n";
    const MESHD: &str = "*nat\n:OUTPUT ACCEPT [0:0]\n:MESHD_OUTPUT - [0:0]\n\
                         -A OUTPUT -p tcp -j MESHD_OUTPUT\nCOMMIT\n";

    #[test]
    fn the_backend_in_use_wins_and_meshds_own_chains_most() {
        assert_eq!(in_use(None, None), None);
        assert_eq!(
            in_use(Some(""), Some(EMPTY_NAT)),
            None,
            "empty tables are not rules"
        );
        assert_eq!(
            in_use(Some(RULES), Some("")).map(|(k, _)| k),
            Some(Kind::Legacy)
        );
        assert_eq!(
            in_use(Some(""), Some(RULES)).map(|(k, _)| k),
            Some(Kind::Nft)
        );
        assert_eq!(
            in_use(Some(RULES), Some(RULES)).map(|(k, _)| k),
            Some(Kind::Legacy)
        );
        assert_eq!(
            in_use(Some(RULES), Some(MESHD)),
            Some((Kind::Nft, "it holds meshd's chains"))
        );
        assert_eq!(
            in_use(Some(MESHD), None).map(|(k, _)| k),
            Some(Kind::Legacy)
        );
    }
}
