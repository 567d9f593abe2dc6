//! `ferry control-plane`: the configuration server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_controlplane::server::{bind, Options};

#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// Its CA, certificate, admin token and (by default) SQLite database; made on
    /// the first start, reused after
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Address for the HTTPS API
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// A DNS name or IP address for the service certificate (repeat; default:
    /// localhost, 127.0.0.1 and the host name)
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// sqlite://PATH or postgres://USER@HOST/DB (default: SQLite in the state dir)
    #[arg(long, value_name = "URL")]
    database: Option<String>,
}

pub fn control_plane(a: ControlPlaneArgs) -> Result<()> {
    let opts = Options {
        state_dir: a.state_dir,
        listen: a.listen,
        server_names: a.server_names,
        database: a.database,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let bound = bind(&opts).await?;
        // The URL is the last (and only) line on stdout, once the socket listens:
        // scripts and tests read it.
        println!("{}", bound.url);
        bound.serve().await;
        Ok(())
    })
}
