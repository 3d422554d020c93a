//! The nat table as `iptables-save` shows it, and the one transaction
//! (`iptables-restore --noflush` input) that takes it to what `init` wants.
//!
//! Applying: declaring a chain (`:MESHD_OUTPUT - [0:0]`) creates it or, if it exists,
//! flushes it, so meshd's four chains are rewritten whole every time; the jump from
//! `PREROUTING` / `OUTPUT` is added only if the table does not already hold exactly
//! that jump, and any other rule of a built-in chain that jumps into meshd's chains (a
//! second copy, an older form) is deleted. A second run therefore leaves exactly the
//! same rules. Cleaning up deletes those jumps and meshd's chains and nothing else.
//! Rules of other chains are never touched, and the transaction is all or nothing:
//! when iptables-restore refuses a line, [`Script::explain`] names that line, its rule
//! and the flag it came from.

use std::collections::BTreeSet;

use super::rules::{CHAINS, JUMPS, Origin, Rule};

/// The built-in chains of the nat table.
const BUILT_IN: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// The nat table: its chains and its rules (`-A <chain> <spec>`, in order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatTable {
    pub chains: BTreeSet<String>,
    pub rules: Vec<(String, String)>,
}

impl NatTable {
    /// The `*nat` section of `iptables-save` output (all tables or only nat); no such
    /// section is an empty table.
    pub fn parse(save: &str) -> NatTable {
        let mut table = NatTable::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_nat = name == "nat";
            } else if !in_nat || line.starts_with('#') {
                continue;
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split_whitespace().next().unwrap_or_default();
                table.chains.insert(name.to_string());
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                table.rules.push((chain.to_string(), spec.to_string()));
            }
        }
        table
    }

    /// Whether any of meshd's chains exists.
    pub fn has_meshd(&self) -> bool {
        CHAINS.iter().any(|c| self.chains.contains(*c))
    }

    fn meshd_chains(&self) -> impl Iterator<Item = &'static str> + '_ {
        CHAINS.into_iter().filter(|c| self.chains.contains(*c))
    }

    /// The rules of built-in chains that jump into meshd's chains.
    fn jumps(&self) -> impl Iterator<Item = &(String, String)> {
        self.rules
            .iter()
            .filter(|(chain, spec)| BUILT_IN.contains(&chain.as_str()) && targets_meshd(spec))
    }
}

fn targets_meshd(spec: &str) -> bool {
    let mut words = spec.split_whitespace();
    while let Some(word) = words.next() {
        if matches!(word, "-j" | "--jump" | "-g" | "--goto") {
            return words.next().is_some_and(|target| CHAINS.contains(&target));
        }
    }
    false
}

/// One line of a transaction, with what a reader needs if it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    origin: Option<Origin>,
}

/// An `iptables-restore --noflush` transaction for the nat table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    lines: Vec<Line>,
}

impl Script {
    fn new() -> Script {
        let mut script = Script { lines: Vec::new() };
        script.push("*nat".to_string(), None);
        script
    }

    fn push(&mut self, text: String, origin: Option<Origin>) {
        self.lines.push(Line { text, origin });
    }

    fn commit(mut self) -> Script {
        self.push("COMMIT".to_string(), None);
        self
    }

    /// The input for `iptables-restore --noflush`.
    pub fn text(&self) -> String {
        self.lines.iter().map(|l| format!("{}\n", l.text)).collect()
    }

    /// How many rules it appends.
    pub fn appended(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| l.text.starts_with("-A "))
            .count()
    }

    /// iptables-restore's complaint, with each line it refused mapped back to its rule
    /// and the flag or annotation that rule comes from.
    pub fn explain(&self, stderr: &str) -> String {
        let complaint = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
        let refused: Vec<String> = failed_lines(stderr)
            .into_iter()
            .filter_map(|n| Some((n, self.lines.get(n.checked_sub(1)?)?)))
            .map(|(number, line)| match line.origin {
                _ if line.text == "COMMIT" => format!(
                    "line {number}, COMMIT: the kernel refused the table as a whole (the legacy \
                     backend does not say which rule; --dry-run shows them all)"
                ),
                Some(origin) => format!("line {number} `{}` ({origin})", line.text),
                None => format!("line {number} `{}`", line.text),
            })
            .collect();
        if refused.is_empty() {
            return complaint;
        }
        format!("{}; it said: {complaint}", refused.join(", "))
    }
}

/// The line numbers iptables-restore names, in order: `line 6: RULE_APPEND failed ...`
/// (nft, one per refused rule), `line 10 failed` (legacy), `Error occurred at line: 3`
/// (a parse error).
fn failed_lines(stderr: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    for (at, word) in stderr.match_indices("line") {
        let rest = stderr[at + word.len()..].trim_start_matches([':', ' ']);
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next();
        if let Some(n) = digits.and_then(|d| d.parse().ok())
            && !lines.contains(&n)
        {
            lines.push(n);
        }
    }
    lines
}

/// The transaction that makes meshd's chains hold `rules`, with one jump into them.
pub fn apply(table: &NatTable, rules: &[Rule]) -> Script {
    let mut script = Script::new();
    let chain_line = Some(Origin::Builtin("meshd's chain"));
    let jump_line = Some(Origin::Builtin("meshd's jump into its chains"));
    for chain in CHAINS {
        script.push(format!(":{chain} - [0:0]"), chain_line);
    }
    let mut kept = BTreeSet::new();
    for (chain, spec) in table.jumps() {
        let jump = (chain.as_str(), spec.as_str());
        if !JUMPS.contains(&jump) || !kept.insert(jump) {
            script.push(format!("-D {chain} {spec}"), jump_line);
        }
    }
    for (chain, spec) in JUMPS {
        if !kept.contains(&(chain, spec)) {
            script.push(format!("-A {chain} {spec}"), jump_line);
        }
    }
    for rule in rules {
        script.push(
            format!("-A {} {}", rule.chain, rule.spec),
            Some(rule.origin),
        );
    }
    script.commit()
}

/// The transaction that removes meshd's jumps and chains; `None` if there are none.
pub fn cleanup(table: &NatTable) -> Option<Script> {
    if !table.has_meshd() {
        return None;
    }
    let mut script = Script::new();
    let jump = Some(Origin::Builtin("meshd's jump into its chains"));
    for (chain, spec) in table.jumps() {
        script.push(format!("-D {chain} {spec}"), jump);
    }
    // Flushed first: meshd's chains jump to each other, and a chain still referenced
    // cannot be deleted (one that a rule outside them still jumps to stays, and so
    // does everything else: the transaction is refused).
    let chain_line = Some(Origin::Builtin(
        "meshd's chain; is a rule outside meshd's chains jumping to it?",
    ));
    for chain in table.meshd_chains() {
        script.push(format!("-F {chain}"), chain_line);
    }
    for chain in table.meshd_chains() {
        script.push(format!("-X {chain}"), chain_line);
    }
    Some(script.commit())
}

/// The transaction that takes meshd's part of `now` back to what it was in `before`
/// (after a later family's transaction was refused): meshd's chains as they were
/// (gone if they were not there), the jumps into them as they were (one that comes
/// back is appended), nothing else touched. `None` if there is nothing to undo.
pub fn roll_back(before: &NatTable, now: &NatTable) -> Option<Script> {
    if before == now {
        return None;
    }
    let mut script = Script::new();
    let ours = Some(Origin::Builtin("meshd's chains, rolled back"));
    let chains: Vec<&str> = CHAINS
        .into_iter()
        .filter(|c| before.chains.contains(*c) || now.chains.contains(*c))
        .collect();
    for chain in &chains {
        script.push(format!(":{chain} - [0:0]"), ours);
    }
    let mut missing: Vec<_> = before.jumps().collect();
    for jump @ (chain, spec) in now.jumps() {
        match missing.iter().position(|j| *j == jump) {
            Some(i) => {
                missing.remove(i);
            }
            None => script.push(format!("-D {chain} {spec}"), ours),
        }
    }
    for (chain, spec) in missing {
        script.push(format!("-A {chain} {spec}"), ours);
    }
    for (chain, spec) in &before.rules {
        if CHAINS.contains(&chain.as_str()) {
            script.push(format!("-A {chain} {spec}"), ours);
        }
    }
    for chain in chains {
        if !before.chains.contains(chain) {
            script.push(format!("-X {chain}"), ours);
        }
    }
    Some(script.commit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::rules::{Capture, Family, default_capture};

    const FRESH: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Tue Dec  1 15:50:38 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -d 192.0.2.1/32 -j RETURN
COMMIT
# Completed on Tue Dec  1 15:50:38 2026
";

    fn capture() -> Capture {
        Capture {
            exclude_outbound_ports: "5432".parse().unwrap(),
            ..default_capture()
        }
    }

    /// What iptables-save shows after `script` was applied to `table` (enough of it
    /// for these tests: -A, -D of whole rules, chain declarations, -F, -X).
    fn applied(table: &NatTable, script: &Script) -> NatTable {
        let mut t = table.clone();
        for line in script.text().lines() {
            let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            match op {
                "-A" => t.rules.push((chain.into(), spec.into())),
                "-D" => {
                    let i = t
                        .rules
                        .iter()
                        .position(|r| *r == (chain.into(), spec.into()));
                    t.rules
                        .remove(i.expect("deleting a rule that is not there"));
                }
                "-F" => t.rules.retain(|(c, _)| c != chain),
                "-X" => assert!(t.chains.remove(chain)),
                _ if op.starts_with(':') => {
                    let chain = &op[1..];
                    t.rules.retain(|(c, _)| c != chain);
                    t.chains.insert(chain.into());
                }
                _ => {}
            }
        }
        t
    }

    #[test]
    fn save_output_is_read_for_the_nat_table_only() {
        let save = format!("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n{FRESH}");
        let table = NatTable::parse(&save);
        assert_eq!(
            table.rules,
            [("OUTPUT".into(), "-d 192.0.2.1/32 -j RETURN".into())]
        );
        assert!(table.chains.contains("POSTROUTING") && !table.has_meshd());
        assert_eq!(NatTable::parse(""), NatTable::default());
    }

    #[test]
    fn a_fresh_table_gets_the_chains_one_jump_each_and_the_rules() {
        let table = NatTable::parse(FRESH);
        let script = apply(&table, &capture().rules(Family::V4));
        let text = script.text();
        assert!(text.starts_with(
            "*nat\n:MESHD_INBOUND - [0:0]\n:MESHD_IN_REDIRECT - [0:0]\n:MESHD_OUTPUT - [0:0]\n\
             :MESHD_REDIRECT - [0:0]\n-A PREROUTING -p tcp -j MESHD_INBOUND\n\
             -A OUTPUT -p tcp -j MESHD_OUTPUT\n-A MESHD_INBOUND "
        ));
        assert!(text.ends_with("-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"));
        assert!(!text.contains("-D "), "{text}");
        assert_eq!(script.appended(), 2 + capture().rules(Family::V4).len());
    }

    #[test]
    fn applying_twice_leaves_the_same_table() {
        let rules = capture().rules(Family::V4);
        let once = applied(
            &NatTable::parse(FRESH),
            &apply(&NatTable::parse(FRESH), &rules),
        );
        let second = apply(&once, &rules);
        assert!(
            !second.text().contains("-A PREROUTING") && !second.text().contains("-A OUTPUT "),
            "the jumps are there already:\n{}",
            second.text()
        );
        assert_eq!(applied(&once, &second), once);
    }

    #[test]
    fn extra_or_old_jumps_are_replaced_by_the_one_jump() {
        let mut table = NatTable::parse(FRESH);
        for chain in CHAINS {
            table.chains.insert(chain.into());
        }
        table
            .rules
            .push(("OUTPUT".into(), "-p tcp -j MESHD_OUTPUT".into()));
        table
            .rules
            .push(("OUTPUT".into(), "-p tcp -j MESHD_OUTPUT".into()));
        table
            .rules
            .push(("PREROUTING".into(), "-j MESHD_INBOUND".into()));
        let script = apply(&table, &capture().rules(Family::V4));
        let after = applied(&table, &script);
        let jumps: Vec<_> = after.jumps().cloned().collect();
        assert_eq!(
            jumps,
            [
                ("OUTPUT".into(), "-p tcp -j MESHD_OUTPUT".into()),
                ("PREROUTING".into(), "-p tcp -j MESHD_INBOUND".into()),
            ]
        );
        assert!(
            after
                .rules
                .contains(&("OUTPUT".into(), "-d 192.0.2.1/32 -j RETURN".into()))
        );
    }

    #[test]
    fn cleanup_removes_exactly_what_apply_added_and_then_nothing() {
        let before = NatTable::parse(FRESH);
        let after = applied(&before, &apply(&before, &capture().rules(Family::V6)));
        let script = cleanup(&after).unwrap();
        assert_eq!(applied(&after, &script), before);
        assert_eq!(cleanup(&before), None);
    }

    #[test]
    fn roll_back_returns_to_the_table_before() {
        let rules = capture().rules(Family::V4);
        let fresh = NatTable::parse(FRESH);
        let once = applied(&fresh, &apply(&fresh, &rules));
        assert_eq!(applied(&once, &roll_back(&fresh, &once).unwrap()), fresh);

        let other = Capture {
            exclude_outbound_ports: "6379".parse().unwrap(),
            ..capture()
        };
        let twice = applied(&once, &apply(&once, &other.rules(Family::V4)));
        assert_ne!(twice, once);
        assert_eq!(applied(&twice, &roll_back(&once, &twice).unwrap()), once);

        let cleaned = applied(&once, &cleanup(&once).unwrap());
        assert_eq!(cleaned, fresh);
        let restored = applied(&cleaned, &roll_back(&once, &cleaned).unwrap());
        assert_eq!(restored.chains, once.chains);
        assert_eq!(restored.rules.len(), once.rules.len());
        for rule in &once.rules {
            assert!(restored.rules.contains(rule), "{rule:?} not restored");
        }
        assert_eq!(roll_back(&once, &once), None);
    }

    #[test]
    fn refused_lines_are_named_with_their_rules_and_flags() {
        let script = apply(&NatTable::parse(FRESH), &capture().rules(Family::V4));
        let number = |needle: &str| {
            script
                .text()
                .lines()
                .position(|l| l.contains(needle))
                .unwrap()
                + 1
        };
        let (port, uid) = (number("--dport 5432"), number("! --uid-owner"));
        let nft = format!(
            "iptables-restore v1.8.9 (nf_tables): \nline {port}: RULE_APPEND failed (Invalid argument): rule in chain MESHD_OUTPUT\n\
             line {uid}: RULE_APPEND failed (Invalid argument): rule in chain MESHD_OUTPUT\n"
        );
        let explained = script.explain(&nft);
        assert_eq!(
            explained,
            format!(
                "line {port} `-A MESHD_OUTPUT -p tcp --dport 5432 -j RETURN` (from \
                 --exclude-outbound-ports (pod annotation meshd.io/exclude-outbound-ports)), \
                 line {uid} `-A MESHD_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN` (from \
                 --proxy-uid); it said: iptables-restore v1.8.9 (nf_tables): line {port}: \
                 RULE_APPEND failed (Invalid argument): rule in chain MESHD_OUTPUT line {uid}: \
                 RULE_APPEND failed (Invalid argument): rule in chain MESHD_OUTPUT"
            )
        );

        let commit = script.text().lines().count();
        let legacy = script.explain(&format!("iptables-restore: line {commit} failed\n"));
        assert!(
            legacy.contains(&format!(
                "line {commit}, COMMIT: the kernel refused the table as a whole"
            )),
            "{legacy}"
        );

        let parse = script
            .explain("Bad argument `x'\nError occurred at line: 2\nTry `iptables-restore -h'");
        assert!(
            parse.starts_with("line 2 `:MESHD_INBOUND - [0:0]`"),
            "{parse}"
        );

        assert_eq!(script.explain("Segmentation fault\n"), "Segmentation fault");
    }
}
