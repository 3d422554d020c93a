//! AuthorizationPolicy enforced by real sidecars, as a table: each case is a real
//! request (HTTP through the caller's and web's sidecars, or a TCP connection to db)
//! whose outcome — status, and the rule named in the denial — must match the table, and
//! `meshctl authz check` must predict the same decision and rule.
//!
//! Phases apply policy sets; each phase waits until the destination sidecars have ACKed
//! the new snapshot, then runs its cases once (no retries: a stale decision fails).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use meshd::authz::check::CheckResponse;
use meshd::authz::eval::Verdict;
use meshd::authz::stats::RuleCount;
use meshd_integration::apps::{HttpApp, TcpApp, tcp_roundtrip};
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::{XdsFlavor, init_test_logging};

const NS: &str = "shop";
const ROOT: &str = "meshd-system";
const WAIT: Duration = Duration::from_secs(15);

/// A request in the table.
#[derive(Debug, Clone, Copy)]
enum To {
    /// `GET|POST …` to web:80, with headers.
    Http(
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    ),
    /// A TCP connection to db:5432.
    Tcp,
}

/// `None`: allowed. `Some(rule)`: denied, naming `rule` (`none` if no ALLOW rule matched).
type Expect = Option<&'static str>;

const ALLOW: Expect = None;

struct Case {
    /// The caller pod: `client` (shop/sa client), `other` (shop/sa other) or `gateway`
    /// (edge/sa gateway).
    from: &'static str,
    to: To,
    expect: Expect,
}

const fn case(from: &'static str, to: To, expect: Expect) -> Case {
    Case { from, to, expect }
}

const fn get(path: &'static str) -> To {
    To::Http("GET", path, &[])
}

struct Mesh {
    dir: MeshDir,
    meshd: Meshd,
    callers: Vec<PodDef>,
    web: Sidecar,
    db: Sidecar,
    _apps: (HttpApp, TcpApp),
    _sidecars: Vec<Sidecar>,
}

async fn mesh() -> anyhow::Result<Mesh> {
    init_test_logging();
    let web_app = HttpApp::start("web-1").await?;
    let db_app = TcpApp::start("db-1").await?;
    let web = PodDef::new(NS, "web-1", "web").serves(8080, web_app.port());
    let db = PodDef::new(NS, "db-1", "db").serves(5432, db_app.port());
    let caller = |ns: &str, app: &str| {
        PodDef::new(ns, &format!("{app}-1"), app)
            .calls("web.shop", 80, free_port())
            .calls("db.shop", 5432, free_port())
    };
    let callers = vec![
        caller(NS, "client"),
        caller(NS, "other"),
        caller("edge", "gateway"),
    ];
    let dir = MeshDir::new()?;
    let mut docs = vec![
        ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
        ServiceDef::new(NS, "db").tcp_port(5432, 5432).yaml(),
        web.yaml(),
        db.yaml(),
    ];
    docs.extend(callers.iter().map(PodDef::yaml));
    dir.write("mesh.yaml", &docs)?;
    let meshd = Meshd::start(dir.path()).await?;
    let web_sidecar = Sidecar::for_pod(&meshd, &web, XdsFlavor::Delta).await?;
    let db_sidecar = Sidecar::for_pod(&meshd, &db, XdsFlavor::Sotw).await?;
    let mut sidecars = Vec::new();
    for pod in &callers {
        sidecars.push(Sidecar::for_pod(&meshd, pod, XdsFlavor::Delta).await?);
    }
    Ok(Mesh {
        dir,
        meshd,
        callers,
        web: web_sidecar,
        db: db_sidecar,
        _apps: (web_app, db_app),
        _sidecars: sidecars,
    })
}

impl Mesh {
    fn caller(&self, app: &str) -> &PodDef {
        self.callers
            .iter()
            .find(|p| p.app == app)
            .expect("a caller of the table")
    }

    /// Writes `file` (or removes it when `docs` is empty) and waits until web and db
    /// have ACKed the snapshot that has it.
    async fn apply(&self, file: &str, docs: &[String]) -> anyhow::Result<()> {
        let before = self.meshd.snapshot().await?.version;
        if docs.is_empty() {
            self.dir.remove(file)?;
        } else {
            self.dir.write(file, docs)?;
        }
        let after = self.meshd.wait_snapshot_after(before).await?;
        ensure!(
            after.config_errors.is_empty(),
            "config errors: {:?}",
            after.config_errors
        );
        for node in [&self.web.node_id, &self.db.node_id] {
            self.meshd.wait_synced(node, after.version).await?;
        }
        Ok(())
    }

    /// Runs every case once against the real sidecars and against `meshctl authz check`.
    async fn run(&self, phase: &str, cases: &[Case]) -> anyhow::Result<()> {
        for (i, c) in cases.iter().enumerate() {
            let what = format!("{phase} case {i}: {} → {:?}", c.from, c.to);
            let real = self.real(c).await.with_context(|| what.clone())?;
            ensure!(
                real == c.expect.map(str::to_string),
                "{what}: expected {:?}, the sidecars said {real:?}",
                c.expect
            );
            let predicted = self.predict(c).await.with_context(|| what.clone())?;
            ensure!(
                predicted == real,
                "{what}: meshctl authz check predicted {predicted:?}, the sidecars said {real:?}"
            );
        }
        Ok(())
    }

    /// What the sidecars did: `None` if allowed, else the rule the denial names.
    async fn real(&self, c: &Case) -> anyhow::Result<Option<String>> {
        let pod = self.caller(c.from);
        match c.to {
            To::Http(method, path, headers) => {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(5))
                    .build()?;
                let mut req =
                    client.request(method.parse()?, format!("http://{}{path}", pod.outbound(0)));
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                let resp = req.send().await?;
                let status = resp.status().as_u16();
                let denied_by = resp
                    .headers()
                    .get("x-meshd-denied-by")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = resp.text().await?;
                match (status, denied_by) {
                    (200, None) => Ok(None),
                    (403, Some(details)) => {
                        ensure!(
                            body.contains(&details),
                            "the 403 body does not name the rule: {body:?}"
                        );
                        let rule = details
                            .strip_prefix("rbac_access_denied_matched_policy[")
                            .and_then(|r| r.strip_suffix(']'))
                            .with_context(|| format!("unexpected denial details {details:?}"))?;
                        Ok(Some(rule.to_string()))
                    }
                    other => anyhow::bail!("unexpected answer {other:?}: {body:?}"),
                }
            }
            To::Tcp => {
                // A denied connection is closed without a word; the rule is in the
                // line db's sidecar logs for it.
                let peer = format!(
                    "peer=spiffe://cluster.local/ns/{}/sa/{}",
                    pod.namespace, pod.service_account
                );
                let denials = |log: &str| -> Vec<String> {
                    log.lines()
                        .filter(|l| l.contains("inbound tcp") && l.contains(&peer))
                        .filter_map(|l| {
                            let rest = l
                                .split("details=rbac_access_denied_matched_policy[")
                                .nth(1)?;
                            Some(rest.split(']').next()?.to_string())
                        })
                        .collect()
                };
                let before = denials(&self.db.log()).len();
                match tcp_roundtrip(pod.outbound(1), "hi").await {
                    Ok(_) => Ok(None),
                    Err(_) => {
                        let rule = eventually("db's log line for the denial", WAIT, || async {
                            let now = denials(&self.db.log());
                            ensure!(now.len() > before, "not logged yet");
                            Ok(now[now.len() - 1].clone())
                        })
                        .await?;
                        Ok(Some(rule))
                    }
                }
            }
        }
    }

    /// What `meshctl authz check` predicts: the rule that denies, if one does.
    async fn predict(&self, c: &Case) -> anyhow::Result<Option<String>> {
        Ok(self.predict_verdict(c).await?.denied_by)
    }

    /// What `meshctl authz check` predicts, in full.
    async fn predict_verdict(&self, c: &Case) -> anyhow::Result<Verdict> {
        let pod = self.caller(c.from);
        let from = format!("{}/{}", pod.namespace, pod.service_account);
        let mut args = vec!["authz", "check", "--from-sa", &from, "-o", "json"];
        let headers: Vec<String>;
        match c.to {
            To::Http(method, path, hs) => {
                headers = hs.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                args.extend(["--to", "shop/web:80", "--method", method, "--path", path]);
                for h in &headers {
                    args.extend(["-H", h]);
                }
            }
            To::Tcp => args.extend(["--to", "shop/db:5432"]),
        }
        let out = self.meshd.meshctl(&args).await?;
        ensure!(
            out.status.success(),
            "meshctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resp: CheckResponse = serde_json::from_slice(&out.stdout)?;
        ensure!(resp.workloads.len() == 1, "{resp:?}");
        let v = &resp.workloads[0].verdict;
        ensure!(v.allowed == resp.allowed && v.allowed == v.denied_by.is_none());
        Ok(v.clone())
    }

    /// Runs `cases` like [`Mesh::run`], and checks that the AUDIT rules each request
    /// matched are the ones given: as `meshctl authz check` predicts them, and as the
    /// destination sidecar's access log records them (`audit=`, the first by name).
    async fn run_audited(&self, phase: &str, cases: &[(Case, &[&str])]) -> anyhow::Result<()> {
        for (i, (c, audit)) in cases.iter().enumerate() {
            let what = format!("{phase} case {i}: {} → {:?}", c.from, c.to);
            let logged_before = self.access_log(c).len();
            let real = self.real(c).await.with_context(|| what.clone())?;
            ensure!(
                real == c.expect.map(str::to_string),
                "{what}: expected {:?}, the sidecars said {real:?}",
                c.expect
            );
            let predicted = self
                .predict_verdict(c)
                .await
                .with_context(|| what.clone())?;
            ensure!(
                predicted.denied_by == real && predicted.audit == *audit,
                "{what}: meshctl authz check predicted {predicted:?}; expected audit {audit:?}"
            );
            let logged = eventually("the request's access log line", WAIT, || async {
                let lines = self.access_log(c);
                ensure!(lines.len() > logged_before, "not logged yet");
                Ok(lines[lines.len() - 1].clone())
            })
            .await
            .with_context(|| what.clone())?;
            let field = logged
                .split(" audit=")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .with_context(|| format!("{what}: no audit= in {logged:?}"))?;
            let expected = audit.first().copied().unwrap_or("-");
            ensure!(
                field == expected,
                "{what}: the access log says audit={field}, expected {expected}: {logged}"
            );
        }
        Ok(())
    }

    /// The destination sidecar's access log lines for requests like `c` from its caller.
    fn access_log(&self, c: &Case) -> Vec<String> {
        let pod = self.caller(c.from);
        let peer = format!(
            "peer=spiffe://cluster.local/ns/{}/sa/{}",
            pod.namespace, pod.service_account
        );
        let (log, what) = match c.to {
            To::Http(method, path, _) => (self.web.log(), format!("inbound \"{method} {path} ")),
            To::Tcp => (self.db.log(), "inbound tcp".to_string()),
        };
        log.lines()
            .filter(|l| l.contains(&what) && l.contains(&peer))
            .map(str::to_string)
            .collect()
    }

    async fn stats(&self, sidecar: &Sidecar) -> anyhow::Result<Vec<RuleCount>> {
        let admin = format!("127.0.0.1:{}", sidecar.admin_port);
        let out = self
            .meshd
            .meshctl(&["authz", "stats", "--proxy-admin", &admin, "-o", "json"])
            .await?;
        ensure!(out.status.success(), "{out:?}");
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// The counter `meshctl authz stats` shows for `rule` and `outcome` (0 if none).
fn count(rows: &[RuleCount], rule: &str, outcome: &str) -> u64 {
    rows.iter()
        .filter(|r| r.rule == rule && r.outcome == outcome)
        .map(|r| r.count)
        .sum()
}

fn policy(ns: &str, name: &str, selector: Option<&str>, action: &str, rules: &str) -> String {
    let selector = selector
        .map(|app| format!("  selector: {{matchLabels: {{app: {app}}}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{selector}  action: {action}\n  rules:\n{rules}"
    )
}

/// ALLOW on web: client by principal; edge by namespace for GET /public*; `other`
/// with `x-team: blue`, or on /regional* unless `x-region` is `us-*` (a condition with
/// only `notValues`).
fn web_allow(with_client: bool) -> String {
    let client = if with_client {
        "    - from: [{source: {principals: [\"cluster.local/ns/shop/sa/client\"]}}]\n"
    } else {
        ""
    };
    policy(
        NS,
        "web-allow",
        Some("web"),
        "ALLOW",
        &format!(
            "{client}    - from: [{{source: {{namespaces: [edge]}}}}]\n      to: [{{operation: {{paths: [\"/public*\"], methods: [GET]}}}}]\n    - from: [{{source: {{principals: [\"*/sa/other\"]}}}}]\n      when: [{{key: \"request.headers[x-team]\", values: [blue]}}]\n    - from: [{{source: {{principals: [\"*/sa/other\"]}}}}]\n      to: [{{operation: {{paths: [\"/regional*\"]}}}}]\n      when: [{{key: \"request.headers[x-region]\", notValues: [\"us-*\"]}}]\n"
        ),
    )
}

fn web_denies() -> Vec<String> {
    vec![
        policy(
            NS,
            "no-admin",
            Some("web"),
            "DENY",
            "    - to: [{operation: {paths: [\"/admin*\"]}}]\n",
        ),
        policy(
            NS,
            "shop-only-writes",
            Some("web"),
            "DENY",
            "    - from: [{source: {notNamespaces: [shop]}}]\n      to: [{operation: {notMethods: [GET, HEAD]}}]\n",
        ),
    ]
}

/// Mesh-wide (root namespace, no selector): the gateway never reaches /internal*. On
/// db's TCP port the path cannot be checked, so it denies the gateway everything.
fn root_deny() -> String {
    policy(
        ROOT,
        "no-internal",
        None,
        "DENY",
        "    - from: [{source: {principals: [\"*/sa/gateway\"]}}]\n      to: [{operation: {paths: [\"/internal*\"]}}]\n",
    )
}

#[tokio::test]
async fn authorization_table_over_real_sidecars() -> anyhow::Result<()> {
    let m = mesh().await?;
    let blue: &[(&str, &str)] = &[("x-team", "blue")];
    let red: &[(&str, &str)] = &[("x-team", "red")];
    let eu: &[(&str, &str)] = &[("x-region", "eu-west")];
    let us: &[(&str, &str)] = &[("x-region", "us-east")];

    // No policy: everything is allowed.
    m.run(
        "no policies",
        &[
            case("client", get("/"), ALLOW),
            case("gateway", get("/admin"), ALLOW),
            case("other", To::Tcp, ALLOW),
        ],
    )
    .await?;

    // ALLOW by principal, by namespace + path prefix + method, by header; implicit deny.
    m.apply("web.yaml", &[web_allow(true)]).await?;
    m.run(
        "allow",
        &[
            case("client", get("/anything"), ALLOW),
            case("gateway", get("/public/x"), ALLOW),
            case("gateway", get("/private"), Some("none")),
            case("gateway", To::Http("POST", "/public/x", &[]), Some("none")),
            case("other", To::Http("GET", "/", blue), ALLOW),
            case("other", To::Http("GET", "/", red), Some("none")),
            case("other", get("/"), Some("none")),
            case("other", To::Http("GET", "/regional", eu), ALLOW),
            case("other", To::Http("GET", "/regional", us), Some("none")),
            case("other", get("/regional"), ALLOW),
            // No policy selects db: still allowed.
            case("gateway", To::Tcp, ALLOW),
        ],
    )
    .await?;

    // DENY overrides ALLOW; notNamespaces + notMethods.
    let mut web = vec![web_allow(true)];
    web.extend(web_denies());
    m.apply("web.yaml", &web).await?;
    m.run(
        "deny",
        &[
            case("client", get("/admin/users"), Some("shop/no-admin#0")),
            case("client", get("/shop"), ALLOW),
            case(
                "gateway",
                To::Http("POST", "/public/x", &[]),
                Some("shop/shop-only-writes#0"),
            ),
            case("gateway", get("/public/x"), ALLOW),
            case("client", To::Http("POST", "/orders", &[]), ALLOW),
        ],
    )
    .await?;

    // A root-namespace policy applies to every workload; TCP ALLOW and implicit deny.
    m.apply("root.yaml", &[root_deny()]).await?;
    m.apply(
        "db.yaml",
        &[policy(
            NS,
            "db-allow",
            Some("db"),
            "ALLOW",
            "    - from: [{source: {principals: [\"*/sa/client\"]}}]\n",
        )],
    )
    .await?;
    m.run(
        "root and tcp",
        &[
            case(
                "gateway",
                get("/internal/x"),
                Some("meshd-system/no-internal#0"),
            ),
            case("gateway", get("/public/x"), ALLOW),
            case("client", To::Tcp, ALLOW),
            case("other", To::Tcp, Some("none")),
            // HTTP-only fields of a DENY rule on TCP: it denies without them.
            case("gateway", To::Tcp, Some("meshd-system/no-internal#0")),
        ],
    )
    .await?;

    // Denials counted by Envoy per rule (web) and per DENY policy (db), as meshctl
    // reads them, and the rule named in the access log of a denied TCP connection.
    let web_stats = m.stats(&m.web).await?;
    for (rule, n) in [
        ("shop/no-admin#0", 1),
        ("shop/shop-only-writes#0", 1),
        ("meshd-system/no-internal#0", 1),
        ("none", 5),
    ] {
        ensure!(
            count(&web_stats, rule, "denied") == n,
            "{rule}: {web_stats:?}"
        );
    }
    let db_stats = m.stats(&m.db).await?;
    for (rule, n) in [("meshd-system/no-internal", 1), ("none", 1)] {
        ensure!(
            count(&db_stats, rule, "denied") == n,
            "{rule}: {db_stats:?}"
        );
    }
    eventually("db's access log to name the TCP denial", WAIT, || async {
        let log = m.db.log();
        ensure!(
            log.lines().any(|l| l.contains("inbound tcp")
                && l.contains("peer=spiffe://cluster.local/ns/edge/sa/gateway")
                && l.contains(
                    "details=rbac_access_denied_matched_policy[meshd-system/no-internal#0]"
                )),
            "no such line in:\n{log}"
        );
        Ok(())
    })
    .await?;

    // AUDIT sees every request, allowed or denied, and never changes the decision;
    // the sidecars' access logs, `meshctl authz check` and `meshctl authz stats` agree
    // on what it saw. An ALLOW rule with HTTP fields never matches on TCP.
    m.apply(
        "audit.yaml",
        &[
            policy(
                NS,
                "web-audit",
                Some("web"),
                "AUDIT",
                "    - to: [{operation: {paths: [\"/orders*\"]}}]\n    - to: [{operation: {paths: [\"/admin*\"]}}]\n",
            ),
            policy(
                NS,
                "db-audit",
                Some("db"),
                "AUDIT",
                "    - from: [{source: {principals: [\"*/sa/other\"]}}]\n",
            ),
        ],
    )
    .await?;
    m.apply(
        "db.yaml",
        &[policy(
            NS,
            "db-allow",
            Some("db"),
            "ALLOW",
            "    - from: [{source: {principals: [\"*/sa/other\"]}}]\n      to: [{operation: {methods: [GET]}}]\n    - from: [{source: {principals: [\"*/sa/client\"]}}]\n",
        )],
    )
    .await?;
    let audited: &[(Case, &[&str])] = &[
        (
            case("client", get("/orders/1"), ALLOW),
            &["shop/web-audit#0"],
        ),
        (
            case("gateway", get("/orders/1"), Some("none")),
            &["shop/web-audit#0"],
        ),
        (
            case("client", get("/admin/x"), Some("shop/no-admin#0")),
            &["shop/web-audit#1"],
        ),
        (case("client", get("/catalog"), ALLOW), &[]),
        (case("other", To::Tcp, Some("none")), &["shop/db-audit#0"]),
        (case("client", To::Tcp, ALLOW), &[]),
    ];
    m.run_audited("audit", audited).await?;
    let web_stats = m.stats(&m.web).await?;
    let db_stats = m.stats(&m.db).await?;
    for rule in ["shop/web-audit#0", "shop/web-audit#1", "shop/db-audit#0"] {
        let expected = audited
            .iter()
            .filter(|(_, audit)| audit.contains(&rule))
            .count() as u64;
        let counted = count(&web_stats, rule, "audited") + count(&db_stats, rule, "audited");
        ensure!(
            counted == expected,
            "meshctl authz stats counts {counted} audits of {rule}, the requests made {expected}:\n{web_stats:?}\n{db_stats:?}"
        );
    }

    // A live change flips a decision: web no longer admits client by principal.
    let mut web = vec![web_allow(false)];
    web.extend(web_denies());
    m.apply("web.yaml", &web).await?;
    m.run(
        "live change",
        &[
            case("client", get("/shop"), Some("none")),
            case("other", To::Http("GET", "/", blue), ALLOW),
        ],
    )
    .await?;

    // Removing every policy restores the default.
    for file in ["web.yaml", "db.yaml", "root.yaml", "audit.yaml"] {
        m.apply(file, &[]).await?;
    }
    m.run(
        "removed",
        &[
            case("client", get("/admin"), ALLOW),
            case("gateway", To::Tcp, ALLOW),
        ],
    )
    .await?;
    Ok(())
}

/// Policies that change while requests flow on kept-alive connections: a path that the
/// old and the new version both deny must never answer anything but 403, in any
/// mixture of the two versions.
#[tokio::test]
async fn no_request_slips_through_while_policies_change() -> anyhow::Result<()> {
    let m = mesh().await?;
    // A DENY renamed and split differently, plus an ALLOW that admits the client:
    // /admin/x is denied throughout, / stays allowed throughout.
    let old = vec![policy(
        NS,
        "no-admin",
        Some("web"),
        "DENY",
        "    - to: [{operation: {paths: [\"/admin*\"]}}]\n",
    )];
    let new = vec![
        policy(
            NS,
            "admin-v2",
            Some("web"),
            "DENY",
            "    - to: [{operation: {paths: [\"/admin\", \"/admin/*\"]}}]\n",
        ),
        policy(
            NS,
            "callers",
            Some("web"),
            "ALLOW",
            "    - from: [{source: {namespaces: [shop]}}]\n",
        ),
    ];
    let seen = flip_while_requesting(&m, &old, &new, "/admin/x", Some("/")).await?;
    ensure!(
        seen == ["shop/admin-v2#0", "shop/no-admin#0"],
        "denials named {seen:?}"
    );

    // Where a version denies by ALLOW and the other by DENY: the old admits only
    // namespace edge, the new denies /x to everyone and has no ALLOW. The old DENY
    // stage (none) with the new ALLOW stage (none) would let the client reach /x, so
    // the stages of a port must change together.
    let old = vec![policy(
        NS,
        "edge-only",
        Some("web"),
        "ALLOW",
        "    - from: [{source: {namespaces: [edge]}}]\n",
    )];
    let new = vec![policy(
        NS,
        "no-x",
        Some("web"),
        "DENY",
        "    - to: [{operation: {paths: [\"/x\"]}}]\n",
    )];
    let seen = flip_while_requesting(&m, &old, &new, "/x", None).await?;
    ensure!(seen == ["none", "shop/no-x#0"], "denials named {seen:?}");
    Ok(())
}

/// Switches web's policies between `old` and `new` six times while the client keeps
/// requesting `denied` (which must always answer 403) and `allowed` (always 200) over
/// kept-alive connections. Returns the rules the denials named, sorted and unique.
async fn flip_while_requesting(
    m: &Mesh,
    old: &[String],
    new: &[String],
    denied: &'static str,
    allowed: Option<&'static str>,
) -> anyhow::Result<Vec<String>> {
    m.apply("web.yaml", old).await?;
    let client = m.caller("client").clone();
    let stop = Arc::new(AtomicBool::new(false));
    let requests = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()?;
            let mut rules = std::collections::BTreeSet::new();
            let (mut denials, mut oks) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let resp = http
                    .get(format!("http://{}{denied}", client.outbound(0)))
                    .send()
                    .await?;
                ensure!(
                    resp.status() == 403,
                    "{denied} got {} during a policy change",
                    resp.status()
                );
                let rule = resp
                    .headers()
                    .get("x-meshd-denied-by")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|d| d.strip_prefix("rbac_access_denied_matched_policy["))
                    .and_then(|r| r.strip_suffix(']'))
                    .context("a 403 without the denying rule")?;
                rules.insert(rule.to_string());
                denials += 1;
                if let Some(path) = allowed {
                    let resp = http
                        .get(format!("http://{}{path}", client.outbound(0)))
                        .send()
                        .await?;
                    ensure!(resp.status() == 200, "{path} got {}", resp.status());
                    oks += 1;
                }
            }
            ensure!(denials > 20, "too few requests: {denials}");
            ensure!(allowed.is_none() || oks > 20, "too few requests: {oks}");
            anyhow::Ok(rules.into_iter().collect())
        })
    };
    for i in 0..6 {
        m.apply("web.yaml", if i % 2 == 0 { new } else { old })
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    requests.await?
}

/// An invalid policy is rejected with the field named, and its previous version keeps
/// applying.
#[tokio::test]
async fn invalid_policy_keeps_the_previous_version() -> anyhow::Result<()> {
    let m = mesh().await?;
    let deny = |block: &str| {
        policy(
            NS,
            "no-admin",
            Some("web"),
            "DENY",
            &format!(
                "    - to: [{{operation: {{paths: [\"/admin*\"]}}}}]\n    - from: [{{source: {{ipBlocks: [\"{block}\"]}}}}]\n"
            ),
        )
    };
    m.apply("web.yaml", &[deny("192.0.2.0/24")]).await?;
    m.run(
        "valid",
        &[case("client", get("/admin"), Some("shop/no-admin#0"))],
    )
    .await?;
    m.dir.write("web.yaml", &[deny("10.0.0.0/33")])?;
    eventually("the bad policy to be reported", WAIT, || async {
        let errs = m.meshd.snapshot().await?.config_errors;
        ensure!(
            errs.iter().any(|e| e.contains("shop/no-admin")
                && e.contains("spec.rules[1].from[0].source.ipBlocks[0]")),
            "{errs:?}"
        );
        Ok(())
    })
    .await?;
    // meshctl authz check names what is wrong with its question.
    for (args, expected) in [
        (
            vec!["--from-sa", "shop/client", "--to", "web:80"],
            "--to must be <namespace>/<service>:<port>",
        ),
        (
            vec!["--from-sa", "shop/client", "--to", "shop/nope:80"],
            "no service shop/nope in the mesh",
        ),
        (
            vec!["--from-sa", "shop/client", "--to", "shop/web:81"],
            "service shop/web has no port 81 (it has 80)",
        ),
        (
            vec!["--from-sa", "client", "--to", "shop/web:80"],
            "--from-sa must be",
        ),
        (vec!["--to", "shop/web:80"], "--from"),
    ] {
        let mut argv = vec!["authz", "check"];
        argv.extend(args.iter().copied());
        let out = m.meshd.meshctl(&argv).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(expected),
            "meshctl {argv:?}: {stderr}"
        );
    }
    m.run(
        "previous version",
        &[
            case("client", get("/admin"), Some("shop/no-admin#0")),
            case("client", get("/"), ALLOW),
        ],
    )
    .await?;
    Ok(())
}

/// A new file `00-dup.yaml` redefining the policy in force replaced it (it sorts first):
/// `GET /admin` went from 403 to 200, and the error named the old file; at a restart
/// it took over too. The policy in force keeps applying, also after a restart, and the
/// newcomer is the error, naming both files.
#[tokio::test]
async fn a_second_definition_does_not_replace_the_policy_in_force() -> anyhow::Result<()> {
    let mut m = mesh().await?;
    m.apply("web.yaml", &web_denies()[..1]).await?;
    let denied = [case("client", get("/admin"), Some("shop/no-admin#0"))];
    m.run("in force", &denied).await?;

    let before = m.meshd.snapshot().await?.version;
    let harmless = policy(
        NS,
        "no-admin",
        Some("web"),
        "DENY",
        "    - to: [{operation: {paths: [\"/nothing\"]}}]\n",
    );
    m.dir
        .write("00-dup.yaml", std::slice::from_ref(&harmless))?;
    let (dup, original) = (
        m.dir.path().join("00-dup.yaml"),
        m.dir.path().join("web.yaml"),
    );
    let expected = format!(
        "{}: document 1 (AuthorizationPolicy shop/no-admin): already defined in {} (document 1), \
         which stays in force: an object can be defined only once",
        dup.display(),
        original.display()
    );
    let errors = eventually("the duplicate to be reported", WAIT, || async {
        let errs = m.meshd.snapshot().await?.config_errors;
        ensure!(!errs.is_empty(), "no error yet");
        Ok(errs)
    })
    .await?;
    // Had the duplicate replaced the policy, the sidecars would have it by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = m.meshd.snapshot().await?;
    m.meshd.wait_synced(&m.web.node_id, now.version).await?;
    m.run("after the duplicate", &denied).await?;
    ensure!(errors == [expected], "{errors:?}");
    ensure!(now.version == before, "the mesh changed: {now:?}");

    // A restart (kill -9) with both files present: nothing is in force when meshd
    // starts, and `00-dup.yaml` sorted first, so it took over. web.yaml is older.
    m.meshd.kill_and_restart().await?;
    let restarted = m.meshd.snapshot().await?;
    m.meshd
        .wait_synced(&m.web.node_id, restarted.version)
        .await?;
    m.run("after a restart", &denied).await?;
    ensure!(
        restarted.config_errors == errors,
        "{:?}",
        restarted.config_errors
    );

    // Once web.yaml is gone, the other definition is the only one, and applies.
    m.apply("web.yaml", &[]).await?;
    m.run(
        "the newcomer alone",
        &[case("client", get("/admin"), ALLOW)],
    )
    .await?;
    Ok(())
}
