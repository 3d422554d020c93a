//! A NACK of a resource that carries policy fails closed: an in-process ADS client plays
//! web's sidecar and rejects its inbound route (HTTP) and its inbound listener (TCP);
//! meshd must push versions that deny every request, say so in `meshctl status`, the
//! log and `/metrics`, never resend what was rejected, and restore the compiled policy
//! once a changed one is accepted — on SotW and on delta streams. A real Envoy that
//! refuses meshd's RBAC altogether (`--disable-extensions`) then gets the 403 naming
//! `invalid-policy`.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::google::protobuf::Any;
use meshd_integration::apps::HttpApp;
use meshd_integration::envoy::Sidecar;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef, web_and_client};
use meshd_integration::meshd::Meshd;
use meshd_integration::net::free_port;
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::{ClientCert, DeltaClient, LDS, RDS, SotwClient, node};
use meshd_integration::{XdsFlavor, init_test_logging};
use prost::Message;

const NS: &str = "shop";
const QUIET: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(10);
const ENVOY_SAYS: &str = "Proto constraint validation failed (RBACPerRouteValidationError.Rbac: \
     embedded message failed validation | caused by SetValidationError.Rules: value must \
     contain at least 1 item(s))";

struct Fixture {
    mesh: MeshDir,
    meshd: Meshd,
    web: PodDef,
}

impl Fixture {
    /// `web-1` serves web on HTTP (8080) and TCP (5432); a policy selects it.
    async fn start() -> anyhow::Result<Fixture> {
        init_test_logging();
        let mesh = MeshDir::new()?;
        let web = PodDef::new(NS, "web-1", "web")
            .serves(8080, free_port())
            .serves(5432, free_port());
        mesh.write(
            "mesh.yaml",
            &[
                ServiceDef::new(NS, "web")
                    .http_port(80, 8080)
                    .tcp_port(5432, 5432)
                    .yaml(),
                web.yaml(),
            ],
        )?;
        write_policy(&mesh, "client")?;
        Ok(Fixture {
            meshd: Meshd::start(mesh.path()).await?,
            mesh,
            web,
        })
    }

    fn set_policy(&self, sa: &str) -> anyhow::Result<()> {
        write_policy(&self.mesh, sa)
    }

    /// The inbound listener of `port`.
    fn name(&self, port: u16) -> String {
        format!("inbound|{}", self.web.inbound(port))
    }

    /// The inbound route of HTTP `port`.
    fn route(&self, port: u16) -> String {
        format!("inbound|{port}")
    }

    fn cert(&self) -> anyhow::Result<ClientCert> {
        ClientCert::mint(&self.meshd.ca_dir(), NS, "web")
    }

    /// The problem lines `meshctl status` shows for web-1, and the fail-closed gauge.
    async fn reported(&self) -> anyhow::Result<(Vec<String>, f64)> {
        let out = self.meshd.meshctl(&["status"]).await?;
        ensure!(out.status.success(), "{out:?}");
        let problems = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("problem: "))
            .map(str::to_string)
            .collect();
        let metrics = self.meshd.metrics().await?;
        let gauge = metrics
            .lines()
            .find_map(|l| l.strip_prefix("meshd_xds_fail_closed_resources "))
            .and_then(|v| v.trim().parse().ok())
            .context("meshd_xds_fail_closed_resources in /metrics")?;
        Ok((problems, gauge))
    }

    /// Waits until status and metrics report exactly the resources `denied` (by type
    /// and name) as fail-closed.
    async fn wait_reported(&self, denied: &[(&str, &str)]) -> anyhow::Result<()> {
        eventually("status and metrics to report it", WAIT, || async {
            let (problems, gauge) = self.reported().await?;
            ensure!(gauge == denied.len() as f64, "gauge {gauge}: {problems:?}");
            ensure!(problems.len() == denied.len(), "{problems:?}");
            for (t, name) in denied {
                ensure!(
                    problems
                        .iter()
                        .any(|p| p.starts_with(&format!("{t} {name}: "))
                            && p.contains("rejected the policy")
                            && p.contains("invalid-policy")),
                    "no problem line for {t} {name}: {problems:?}"
                );
            }
            Ok(())
        })
        .await
    }
}

/// ALLOW only `shop/<sa>` on web-1 (both ports).
fn write_policy(mesh: &MeshDir, sa: &str) -> anyhow::Result<()> {
    mesh.write(
        "policy.yaml",
            &[format!(
                "apiVersion: security.meshd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: callers, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n    - from: [{{source: {{principals: [\"cluster.local/ns/{NS}/sa/{sa}\"]}}}}]\n"
            )],
        )
}

fn decode<M: Message + Default>(any: &Any) -> anyhow::Result<M> {
    Ok(M::decode(any.value.as_slice())?)
}

/// Whether `route` is the fail-closed one: a 403 for everything naming invalid-policy.
fn denies_everything(route: &RouteConfiguration) -> bool {
    let routes = &route.virtual_hosts[0].routes;
    routes.len() == 1
        && matches!(&routes[0].action, Some(route::Action::DirectResponse(d)) if d.status == 403)
        && routes[0].response_headers_to_add.iter().any(|h| {
            h.header.as_ref().is_some_and(|h| {
                h.key == "x-meshd-denied-by" && h.value.starts_with("invalid-policy")
            })
        })
}

/// Whether `route` is a compiled inbound route: to the app, with its RBAC overrides.
fn compiled(route: &RouteConfiguration) -> bool {
    let r = &route.virtual_hosts[0].routes[0];
    matches!(r.action, Some(route::Action::Route(_))) && r.typed_per_filter_config.len() == 3
}

/// The network RBAC filters of a TCP listener, by stat prefix.
fn network_rbac(listener: &Listener) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for f in &listener.filter_chains[0].filters {
        if let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type
            && any.type_url.ends_with("network.rbac.v3.RBAC")
        {
            out.push(decode::<NetworkRbac>(any)?.stat_prefix);
        }
    }
    Ok(out)
}

/// Whether the HTTP listener serves its route inline (the fail-closed one) or by RDS.
fn inline_route(listener: &Listener) -> anyhow::Result<Option<RouteConfiguration>> {
    let f = &listener.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        bail!("no typed config");
    };
    let hcm: HttpConnectionManager = decode(any)?;
    Ok(match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(r)) => Some(r),
        _ => None,
    })
}

#[tokio::test]
async fn sotw_a_rejected_route_or_listener_denies_everything_until_a_changed_policy_is_accepted()
-> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let (http, tcp) = (f.name(8080), f.name(5432));
    let rds = f.route(8080);
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert()?).await?;

    // LDS: the proxy rejects both inbound listeners; it never accepted any, so both are
    // suspects and come back denying everything.
    c.request(Some(node(NS, "web-1", "web")), LDS, &[], None)
        .await?;
    let l1 = c.recv().await?;
    c.nack(
        &l1,
        &[],
        "Error adding/updating listener(s) inbound|…: something",
    )
    .await?;
    let l2 = c.recv().await?;
    let listeners: Vec<Listener> = l2.resources.iter().map(decode).collect::<Result<_, _>>()?;
    let by_name = |n: &str| {
        listeners.iter().find(|l| l.name == n).with_context(|| {
            let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
            format!("no listener {n} in {names:?}")
        })
    };
    ensure!(
        network_rbac(by_name(&tcp)?)? == [format!("{tcp}.deny.invalid-policy.")],
        "the TCP listener denies every connection by invalid-policy"
    );
    let denying = inline_route(by_name(&http)?)?.context("the HTTP listener's route inline")?;
    ensure!(denies_everything(&denying));
    c.request(None, LDS, &[], Some(&l2)).await?;
    f.wait_reported(&[("lds", &http), ("lds", &tcp)]).await?;
    ensure!(
        f.meshd.log().contains("rejected the policy meshd compiled"),
        "logged"
    );

    // RDS: the proxy rejects the compiled route; the next push denies everything.
    c.request(None, RDS, &[&rds], None).await?;
    let r1 = c.recv().await?;
    ensure!(compiled(&decode(&r1.resources[0])?));
    c.nack(&r1, &[&rds], ENVOY_SAYS).await?;
    let r2 = c.recv().await?;
    let route: RouteConfiguration = decode(&r2.resources[0])?;
    ensure!(route.name == rds && denies_everything(&route), "{route:?}");
    c.request(None, RDS, &[&rds], Some(&r2)).await?;
    f.wait_reported(&[("lds", &http), ("lds", &tcp), ("rds", &rds)])
        .await?;
    let (problems, _) = f.reported().await?;
    ensure!(
        problems
            .iter()
            .any(|p| p.contains("SetValidationError.Rules")),
        "Envoy's reason in {problems:?}"
    );
    // What was rejected is never sent again while it is what meshd compiles.
    c.expect_silence(QUIET).await?;

    // A changed policy: the route and the TCP listener compile anew and are tried; the
    // HTTP listener does not carry the policy and stays as it was. Accepted: restored.
    f.set_policy("other")?;
    let l3 = c.recv().await?;
    ensure!(l3.type_url == LDS);
    let listeners: Vec<Listener> = l3.resources.iter().map(decode).collect::<Result<_, _>>()?;
    let tcp_listener = listeners.iter().find(|l| l.name == tcp).context("tcp")?;
    ensure!(
        network_rbac(tcp_listener)? == [format!("{tcp}.allow.")],
        "the compiled TCP listener again"
    );
    c.request(None, LDS, &[], Some(&l3)).await?;
    let r3 = c.recv().await?;
    ensure!(r3.type_url == RDS && compiled(&decode(&r3.resources[0])?));
    c.request(None, RDS, &[&rds], Some(&r3)).await?;
    f.wait_reported(&[("lds", &http)]).await?;

    // Rejected again: denying again.
    f.set_policy("client")?;
    let l4 = c.recv().await?;
    c.request(None, LDS, &[], Some(&l4)).await?;
    let r4 = c.recv().await?;
    c.nack(&r4, &[&rds], ENVOY_SAYS).await?;
    let r5 = c.recv().await?;
    ensure!(denies_everything(&decode(&r5.resources[0])?));
    c.request(None, RDS, &[&rds], Some(&r5)).await?;
    f.wait_reported(&[("lds", &http), ("rds", &rds)]).await?;

    // The stream's end ends its fail-closed state.
    drop(c);
    f.wait_reported(&[]).await?;
    Ok(())
}

#[tokio::test]
async fn delta_a_rejected_route_denies_everything_until_a_changed_policy_is_accepted()
-> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let rds = f.route(8080);
    let mut d = DeltaClient::connect(f.meshd.xds_addr, &f.cert()?).await?;
    d.subscribe(Some(node(NS, "web-1", "web")), LDS, &[])
        .await?;
    let l1 = d.recv().await?;
    d.ack(&l1).await?;
    d.subscribe(None, RDS, &[&rds]).await?;
    let r1 = d.recv().await?;
    ensure!(compiled(&decode(
        r1.resources[0].resource.as_ref().context("body")?
    )?));
    d.send(
        envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            type_url: RDS.to_string(),
            response_nonce: r1.nonce.clone(),
            error_detail: Some(envoy_types::pb::google::rpc::Status {
                code: 3,
                message: ENVOY_SAYS.to_string(),
                details: vec![],
            }),
            ..Default::default()
        },
    )
    .await?;
    let r2 = d.recv().await?;
    ensure!(r2.resources.len() == 1 && r2.resources[0].name == rds);
    ensure!(denies_everything(&decode(
        r2.resources[0].resource.as_ref().context("body")?
    )?));
    d.ack(&r2).await?;
    f.wait_reported(&[("rds", &rds)]).await?;
    d.expect_silence(QUIET).await?;

    // A changed policy compiles anew; accepted, the compiled policy is back.
    f.set_policy("other")?;
    let r3 = loop {
        let r = d.recv().await?;
        d.ack(&r).await?;
        if r.type_url == RDS {
            break r;
        }
    };
    ensure!(compiled(&decode(
        r3.resources[0].resource.as_ref().context("body")?
    )?));
    f.wait_reported(&[]).await?;
    Ok(())
}

/// A real Envoy that has no RBAC filter at all (`--disable-extensions`) rejects every
/// inbound listener and route meshd compiles for it: requests to its pod get 403 naming
/// `invalid-policy`, never the app.
#[tokio::test]
async fn a_real_envoy_that_rejects_the_policy_denies_every_request() -> anyhow::Result<()> {
    init_test_logging();
    let app = HttpApp::start("web-1").await?;
    let (mesh, web, client) = web_and_client(NS, app.port())?;
    let meshd = Meshd::start(mesh.path()).await?;
    let _web = Sidecar::start_with_args(
        &meshd,
        NS,
        "web-1",
        "web",
        XdsFlavor::Delta,
        &[
            "--disable-extensions",
            "envoy.filters.http/envoy.filters.http.rbac",
        ],
    )
    .await?;
    let _client = Sidecar::for_pod(&meshd, &client, XdsFlavor::Delta).await?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    eventually("a 403 naming invalid-policy", WAIT, || async {
        let resp = http
            .get(format!("http://{}/", client.outbound(0)))
            .send()
            .await?;
        let status = resp.status().as_u16();
        let header = resp
            .headers()
            .get("x-meshd-denied-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.text().await?;
        ensure!(
            status == 403
                && header.starts_with("invalid-policy")
                && body.contains("invalid-policy"),
            "{status} {header:?} {body:?}"
        );
        Ok(())
    })
    .await?;
    let out = meshd.meshctl(&["status"]).await?;
    let status = String::from_utf8_lossy(&out.stdout);
    ensure!(
        status.contains(&format!("problem: lds inbound|{}", web.inbound(8080)))
            && status.contains("invalid-policy"),
        "{status}"
    );
    Ok(())
}
