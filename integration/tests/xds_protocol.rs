//! The xDS protocol as Envoy speaks it, checked request by request with an in-process
//! gRPC client against a real meshd: versions and nonces, ACK and NACK, stale nonces,
//! wildcard and named subscriptions, resources that do not exist, removals on delta
//! streams, reconnects with known versions, unknown types, bad nodes and proxies that
//! vanish mid-stream.

use std::time::Duration;

use anyhow::{Context, ensure};
use meshd_integration::init_test_logging;
use meshd_integration::mesh::{MeshDir, PodDef, ServiceDef};
use meshd_integration::meshd::Meshd;
use meshd_integration::wait::eventually;
use meshd_integration::xds_client::{
    CDS, ClientCert, DeltaClient, EDS, LDS, RDS, SotwClient, node, resource_names,
};

const NS: &str = "shop";
const WEB: &str = "outbound|80||web.shop.svc.cluster.local";
const DB: &str = "outbound|5432||db.shop.svc.cluster.local";
const API: &str = "outbound|9000||api.shop.svc.cluster.local";
const QUIET: Duration = Duration::from_millis(400);

struct Fixture {
    mesh: MeshDir,
    meshd: Meshd,
    client: PodDef,
}

impl Fixture {
    /// `client-1` calls `web` (HTTP) and `db` (TCP); `web-1` and `db-1` serve them.
    async fn start() -> anyhow::Result<Fixture> {
        init_test_logging();
        let mesh = MeshDir::new()?;
        let web = PodDef::new(NS, "web-1", "web").serves(8080, 18080);
        let db = PodDef::new(NS, "db-1", "db").serves(5432, 15432);
        let client = PodDef::new(NS, "client-1", "client")
            .calls("web", 80, 15001)
            .calls("db", 5432, 15002);
        mesh.write(
            "services.yaml",
            &[
                ServiceDef::new(NS, "web").http_port(80, 8080).yaml(),
                ServiceDef::new(NS, "db").tcp_port(5432, 5432).yaml(),
            ],
        )?;
        mesh.write("pods.yaml", &[web.yaml(), db.yaml()])?;
        mesh.write("client.yaml", &[client.yaml()])?;
        let meshd = Meshd::start(mesh.path()).await?;
        Ok(Fixture {
            mesh,
            meshd,
            client,
        })
    }

    /// A client certificate for `shop/<service_account>` from meshd's CA.
    fn cert(&self, service_account: &str) -> anyhow::Result<ClientCert> {
        ClientCert::mint(&self.meshd.ca_dir(), NS, service_account)
    }

    /// Adds the `api` service and makes the client call it: a new cluster, endpoints,
    /// listener and route for the client.
    fn add_api(&self) -> anyhow::Result<()> {
        let api = PodDef::new(NS, "api-1", "api").serves(9000, 19000);
        self.mesh.write(
            "api.yaml",
            &[
                ServiceDef::new(NS, "api").http_port(9000, 9000).yaml(),
                api.yaml(),
            ],
        )?;
        self.mesh.write(
            "client.yaml",
            &[self.client.clone().calls("api", 9000, 15003).yaml()],
        )
    }
}

#[tokio::test]
async fn sotw_versions_acks_nacks_and_stale_nonces() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    c.request(Some(node(NS, "client-1", "client")), CDS, &[], None)
        .await?;
    let r1 = c.recv().await?;
    assert_eq!(r1.type_url, CDS);
    assert_eq!(resource_names(&r1)?, [DB, WEB]);
    assert!(!r1.version_info.is_empty() && !r1.nonce.is_empty());

    // ACK: nothing more to say.
    c.request(None, CDS, &[], Some(&r1)).await?;
    c.expect_silence(QUIET).await?;

    // A change brings a new version with a new nonce.
    f.add_api()?;
    let r2 = c.recv().await?;
    assert_eq!(resource_names(&r2)?, [DB, WEB, API]);
    assert_ne!(r2.nonce, r1.nonce);
    assert_ne!(r2.version_info, r1.version_info);

    // NACK: recorded, and the same config is not pushed again.
    c.nack(&r2, &[], "cluster api: something Envoy did not like")
        .await?;
    c.expect_silence(QUIET).await?;
    let proxies = f.meshd.proxies().await?;
    let cds = &proxies[0].types["cds"];
    assert!(cds.nacked);
    let nack = cds.last_nack.as_ref().context("NACK recorded")?;
    assert_eq!(nack.message, "cluster api: something Envoy did not like");
    assert_eq!(nack.nonce, r2.nonce);
    assert!(
        f.meshd.log().contains("something Envoy did not like"),
        "NACK is logged"
    );
    let status = f.meshd.meshctl(&["status"]).await?;
    assert!(String::from_utf8_lossy(&status.stdout).contains("cds rejected at"));

    // A request that answers an older nonce is stale and ignored.
    c.request(None, CDS, &[], Some(&r1)).await?;
    c.expect_silence(QUIET).await?;

    // The next change is pushed again; its ACK clears the NACK state.
    f.mesh.remove("api.yaml")?;
    let r3 = c.recv().await?;
    assert_eq!(resource_names(&r3)?, [DB, WEB]);
    c.request(None, CDS, &[], Some(&r3)).await?;
    eventually(
        "the ACK to clear the NACK",
        Duration::from_secs(5),
        || async {
            let p = f.meshd.proxies().await?;
            ensure!(
                !p[0].types["cds"].nacked && !p[0].types["cds"].pending,
                "{:?}",
                p[0].types
            );
            Ok(())
        },
    )
    .await?;

    // /metrics counts what happened: one proxy, pushes and bytes by type, the NACK,
    // snapshots, and the proxy's convergence after each change.
    let metrics = f.meshd.metrics().await?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(-1.0)
    };
    assert_eq!(value("meshd_connected_proxies "), 1.0, "{metrics}");
    assert!(
        value("meshd_xds_pushes_total{type=\"cds\"} ") >= 3.0,
        "{metrics}"
    );
    assert!(
        value("meshd_xds_sent_bytes_total{type=\"cds\"} ") > 100.0,
        "{metrics}"
    );
    assert_eq!(
        value("meshd_xds_nacks_total{type=\"cds\"} "),
        1.0,
        "{metrics}"
    );
    assert!(value("meshd_snapshots_total ") >= 2.0, "{metrics}");
    assert!(
        value("meshd_xds_convergence_seconds_count ") >= 1.0,
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn sotw_named_subscriptions_skip_resources_that_do_not_exist() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    let nope = "outbound|1||nope.shop.svc.cluster.local";
    c.request(
        Some(node(NS, "client-1", "client")),
        EDS,
        &[WEB, nope],
        None,
    )
    .await?;
    let r = c.recv().await?;
    assert_eq!(resource_names(&r)?, [WEB]);
    // Only the names asked for, even though the client also may call db.
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice())?;
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);

    // Asking only for a name that does not exist gets no answer.
    let mut c2 = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    c2.request(Some(node(NS, "client-1", "client")), RDS, &[nope], None)
        .await?;
    c2.expect_silence(QUIET).await?;
    Ok(())
}

#[tokio::test]
async fn a_change_pushes_clusters_before_listeners_and_listeners_before_routes()
-> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    let n = Some(node(NS, "client-1", "client"));
    c.request(n, CDS, &[], None).await?;
    let cds = c.recv().await?;
    c.request(None, CDS, &[], Some(&cds)).await?;
    c.request(None, EDS, &[WEB, DB], None).await?;
    let eds = c.recv().await?;
    c.request(None, EDS, &[WEB, DB], Some(&eds)).await?;
    c.request(None, LDS, &[], None).await?;
    let lds = c.recv().await?;
    c.request(None, LDS, &[], Some(&lds)).await?;
    c.request(None, RDS, &[WEB], None).await?;
    let rds = c.recv().await?;
    c.request(None, RDS, &[WEB], Some(&rds)).await?;
    c.expect_silence(QUIET).await?;

    // Make the client call a new HTTP service: its cluster must arrive before the
    // listener that uses it.
    f.add_api()?;
    let first = c.recv().await?;
    let second = c.recv().await?;
    assert_eq!(first.type_url, CDS);
    assert_eq!(second.type_url, LDS);
    assert!(resource_names(&first)?.contains(&API.to_string()));
    // The route arrives only once the proxy asks for it by name, after the listener.
    c.request(None, RDS, &[WEB, API], Some(&rds)).await?;
    let routes = c.recv().await?;
    assert_eq!(resource_names(&routes)?, [WEB, API]);
    Ok(())
}

#[tokio::test]
async fn unknown_type_urls_are_ignored_and_reported() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    let unknown = "type.googleapis.com/envoy.config.example.v3.Nothing";
    c.request(Some(node(NS, "client-1", "client")), unknown, &[], None)
        .await?;
    c.expect_silence(QUIET).await?;
    // The stream still works.
    c.request(None, CDS, &[], None).await?;
    assert_eq!(c.recv().await?.type_url, CDS);
    let proxies = f.meshd.proxies().await?;
    assert_eq!(proxies[0].unknown_type_urls, [unknown]);
    Ok(())
}

#[tokio::test]
async fn a_stream_without_node_metadata_is_refused() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    let mut bare = node(NS, "client-1", "client");
    bare.metadata = None;
    c.request(Some(bare), CDS, &[], None).await?;
    let status = c.recv_status().await?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("node.metadata.namespace"),
        "{}",
        status.message()
    );

    let mut d = DeltaClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    d.subscribe(None, CDS, &[]).await?;
    let err = d.recv().await.unwrap_err();
    let status = err
        .downcast_ref::<tonic::Status>()
        .context("a gRPC status")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("must carry `node`"));
    Ok(())
}

#[tokio::test]
async fn a_pod_that_is_not_in_the_mesh_gets_an_empty_config_until_it_appears() -> anyhow::Result<()>
{
    let f = Fixture::start().await?;
    let mut c = SotwClient::connect(f.meshd.xds_addr, &f.cert("late")?).await?;
    c.request(Some(node(NS, "late-1", "late")), CDS, &[], None)
        .await?;
    let r = c.recv().await?;
    assert!(r.resources.is_empty());
    let p = f.meshd.proxies().await?;
    assert!(
        p[0].problems[0].contains("no pod shop/late-1"),
        "{:?}",
        p[0].problems
    );
    c.request(None, CDS, &[], Some(&r)).await?;
    f.mesh.write(
        "late.yaml",
        &[PodDef::new(NS, "late-1", "late")
            .calls("web", 80, 15009)
            .yaml()],
    )?;
    let r = c.recv().await?;
    assert_eq!(resource_names(&r)?, [WEB]);
    Ok(())
}

#[tokio::test]
async fn delta_subscriptions_removals_and_reconnects() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut d = DeltaClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    d.subscribe(Some(node(NS, "client-1", "client")), CDS, &[])
        .await?;
    let r1 = d.recv().await?;
    let mut names: Vec<_> = r1.resources.iter().map(|r| r.name.clone()).collect();
    names.sort();
    assert_eq!(names, [DB, WEB]);
    assert!(r1.removed_resources.is_empty());
    d.ack(&r1).await?;
    d.expect_silence(QUIET).await?;

    // Named EDS: a name that does not exist is reported as removed.
    let nope = "outbound|1||nope.shop.svc.cluster.local";
    d.subscribe(None, EDS, &[WEB, nope]).await?;
    let e1 = d.recv().await?;
    assert_eq!(e1.resources.len(), 1);
    assert_eq!(e1.resources[0].name, WEB);
    assert_eq!(e1.removed_resources, [nope]);
    d.ack(&e1).await?;

    // Only what changed is sent: a new service adds one cluster.
    f.add_api()?;
    let r2 = d.recv().await?;
    assert_eq!(r2.type_url, CDS);
    let added: Vec<_> = r2.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(added, [API]);
    d.ack(&r2).await?;

    // Deleting the service removes its cluster.
    f.mesh.remove("api.yaml")?;
    let r3 = d.recv().await?;
    assert_eq!(r3.type_url, CDS);
    assert!(r3.resources.is_empty());
    assert_eq!(r3.removed_resources, [API]);
    d.ack(&r3).await?;

    // Reconnecting with the versions it has: nothing is resent.
    let versions = r1
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(d);
    let mut d2 = DeltaClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    d2.send(
        envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
            node: Some(node(NS, "client-1", "client")),
            type_url: CDS.to_string(),
            initial_resource_versions: versions,
            ..Default::default()
        },
    )
    .await?;
    let r4 = d2.recv().await?;
    assert!(
        r4.resources.is_empty(),
        "resent {:?}",
        r4.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    assert!(r4.removed_resources.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_proxy_vanishing_mid_stream_does_not_disturb_the_others() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut gone = SotwClient::connect(f.meshd.xds_addr, &f.cert("web")?).await?;
    gone.request(Some(node(NS, "web-1", "web")), CDS, &[], None)
        .await?;
    gone.recv().await?;
    let mut stays = SotwClient::connect(f.meshd.xds_addr, &f.cert("client")?).await?;
    stays
        .request(Some(node(NS, "client-1", "client")), CDS, &[], None)
        .await?;
    let r = stays.recv().await?;
    stays.request(None, CDS, &[], Some(&r)).await?;
    assert_eq!(f.meshd.proxies().await?.len(), 2);

    drop(gone);
    eventually(
        "meshd to forget the vanished proxy",
        Duration::from_secs(5),
        || async {
            let p = f.meshd.proxies().await?;
            ensure!(p.len() == 1 && p[0].node_id == "client-1.shop", "{p:?}");
            Ok(())
        },
    )
    .await?;
    f.add_api()?;
    let r = stays.recv().await?;
    assert_eq!(resource_names(&r)?, [DB, WEB, API]);
    Ok(())
}
