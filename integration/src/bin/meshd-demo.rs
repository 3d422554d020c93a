//! `meshd-demo`: meshd serving a mesh (the example mesh by default) to real Envoy
//! sidecars, with real requests flowing through them. Installs Envoy if needed.

use std::path::PathBuf;

use clap::Parser;
use meshd_integration::XdsFlavor;
use meshd_integration::tools::workspace_root;

/// Run meshd on a mesh directory with a real Envoy sidecar per pod and show traffic.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The mesh directory (default: the repository's examples/mesh).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Use state-of-the-world xDS instead of delta.
    #[arg(long)]
    sotw: bool,
    /// Requests to send through each upstream.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Exit after the requests instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args
        .config_dir
        .unwrap_or_else(|| workspace_root().join("examples").join("mesh"));
    let flavor = if args.sotw {
        XdsFlavor::Sotw
    } else {
        XdsFlavor::Delta
    };
    let demo = meshd_integration::demo::run(&dir, flavor, args.requests).await?;
    if args.once {
        return Ok(());
    }
    let meshctl = meshd_integration::tools::meshd_binary("meshctl")?;
    println!();
    println!("The mesh is running. Try, in another terminal:");
    println!(
        "  curl -s http://127.0.0.1:15001/          # frontend-1 → web, balanced over web-1 and web-2"
    );
    // meshctl mints its operator certificate from meshd's CA directory.
    let env = format!(
        "MESHD_ADMIN={} MESHD_CA_DIR={}",
        demo.meshd.admin_url(),
        demo.meshd.ca_dir().display()
    );
    println!("  {env} {} status", meshctl.display());
    println!("  {env} {} proxy-config shop/frontend-1", meshctl.display());
    println!(
        "  edit or delete a file in {} and watch the proxies follow",
        dir.display()
    );
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
