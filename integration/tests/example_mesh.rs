//! The example mesh shipped in `examples/mesh` is valid and works end to end: this is
//! exactly what the README's first command shows a newcomer.

use std::collections::BTreeSet;

use meshd_integration::tools::{meshd_binary, workspace_root};
use meshd_integration::{XdsFlavor, demo, init_test_logging};

#[tokio::test]
async fn the_example_mesh_serves_http_and_tcp_through_real_sidecars() -> anyhow::Result<()> {
    init_test_logging();
    let dir = workspace_root().join("examples").join("mesh");

    let analyze = std::process::Command::new(meshd_binary("meshctl")?)
        .arg("analyze")
        .arg(&dir)
        .output()?;
    let printed = String::from_utf8_lossy(&analyze.stdout);
    assert!(analyze.status.success(), "{printed}");
    assert!(printed.contains("no problems"), "{printed}");

    let demo = demo::run(&dir, XdsFlavor::Delta, 6).await?;
    let http: BTreeSet<_> = demo
        .transcript
        .iter()
        .filter(|l| l.contains("shop/web:80 (via"))
        .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        http,
        BTreeSet::from(["web-1".to_string(), "web-2".to_string()])
    );
    assert!(
        demo.transcript
            .iter()
            .any(|l| l.ends_with("shop/db:5432 (via 127.0.0.1:15002): db-1: hello #0"))
    );
    // The example's AuthorizationPolicy keeps everyone out of /admin, and says so.
    assert!(
        demo.transcript.iter().any(|l| l.ends_with(
            "shop/web:80 GET /admin: HTTP 403: access denied by meshd authorization: \
             rbac_access_denied_matched_policy[shop/no-admin#0]"
        )),
        "{:#?}",
        demo.transcript
    );
    let status = demo.meshd.meshctl(&["status"]).await?;
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(printed.contains("frontend-1.shop"), "{printed}");
    Ok(())
}
