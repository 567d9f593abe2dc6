//! `ferry control-plane`: the configuration server.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_controlplane::jobs::runner::RunnerConfig;
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
    /// Blob store whose machines get retention jobs and whose points the API shows:
    /// file:///abs/path, az://container or s3://bucket (as the process server's)
    #[arg(long, value_name = "URL", requires = "key_file")]
    store: Option<String>,
    /// The vault key file of that store
    #[arg(long, value_name = "FILE", requires = "store")]
    key_file: Option<PathBuf>,
    /// Another control plane of the site, on the same --database: its state
    /// directory, from which this one copies the site CA (ca.pem, ca.key) and
    /// admin.token on its first start. Without it, a control plane starting on a
    /// database that serves a site must have those files already
    #[arg(long, value_name = "DIR")]
    join: Option<PathBuf>,
    /// Jobs this control plane runs at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs_at_once: u16,
    /// Seconds a lease holds unless renewed: how long a job, or the scheduled work
    /// (health sweep, retention schedule, pruning), of a killed control plane waits
    /// before another takes it over
    #[arg(long, default_value_t = 30.0)]
    job_lease_s: f64,
    /// Tests only: milliseconds to pause before each task of a job
    #[arg(long, default_value_t = 0, hide = true)]
    job_step_delay_ms: u64,
}

pub fn control_plane(a: ControlPlaneArgs) -> Result<()> {
    if !(a.job_lease_s.is_finite() && (1.0..=3600.0).contains(&a.job_lease_s)) {
        bail!("--job-lease-s must be from 1 to 3600 seconds");
    }
    let runner = RunnerConfig {
        lease: Duration::from_secs_f64(a.job_lease_s),
        max_running: usize::from(a.jobs_at_once),
        step_delay: Duration::from_millis(a.job_step_delay_ms),
        ..RunnerConfig::default()
    };
    let opts = Options {
        state_dir: a.state_dir,
        listen: a.listen,
        server_names: a.server_names,
        database: a.database,
        store: a.store.zip(a.key_file),
        runner,
        join: a.join,
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
