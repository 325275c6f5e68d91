//! How client commands find the fabric and their token: flags, else MESH_FABRIC and
//! MESH_TOKEN, else a client config file (`--config`, MESH_CONFIG, or
//! ~/.config/mesh/client.toml, which `mesh up` leaves behind).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use mesh_common::client::{Client, ClientConfig};
use serde::Deserialize;

pub const DEFAULT_FABRIC: &str = "127.0.0.1:7700";

#[derive(Args, Debug, Clone)]
pub struct FabricArgs {
    /// Fabric line-protocol address HOST:PORT [env: MESH_FABRIC; default from the client
    /// config, else 127.0.0.1:7700].
    #[arg(long, global = true, value_name = "ADDR")]
    pub fabric: Option<String>,
    /// Token [env: MESH_TOKEN; default from the client config].
    #[arg(long, global = true, value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token, e.g. the fabric's DATA/admin.token.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Client config file (TOML with fabric, token or token_file) [env: MESH_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The client config file's contents.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub fabric: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
}

/// ~/.config/mesh/client.toml (or under $XDG_CONFIG_HOME).
pub fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("mesh").join("client.toml"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn read_token_file(path: &Path) -> Result<String> {
    let t =
        std::fs::read_to_string(path).with_context(|| format!("token file {}", path.display()))?;
    Ok(t.trim().to_string())
}

impl FabricArgs {
    pub fn resolve(&self) -> Result<ClientConfig> {
        let config_path = self
            .config
            .clone()
            .or_else(|| env("MESH_CONFIG").map(PathBuf::from))
            .or_else(|| default_config_path().filter(|p| p.is_file()));
        let file = match &config_path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("client config {}", p.display()))?;
                toml::from_str::<ConfigFile>(&text)
                    .with_context(|| format!("client config {}", p.display()))?
            }
            None => ConfigFile::default(),
        };
        let fabric = self
            .fabric
            .clone()
            .or_else(|| env("MESH_FABRIC"))
            .or(file.fabric)
            .unwrap_or_else(|| DEFAULT_FABRIC.to_string());
        let token = if let Some(t) = &self.token {
            t.clone()
        } else if let Some(p) = &self.token_file {
            read_token_file(p)?
        } else if let Some(t) = env("MESH_TOKEN") {
            t
        } else if let Some(t) = file.token {
            t
        } else if let Some(p) = &file.token_file {
            read_token_file(p)?
        } else {
            bail!(
                "no token: pass --token or --token-file, set MESH_TOKEN, or write token_file = \"...\" into {}",
                default_config_path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "a client config".into())
            );
        };
        Ok(ClientConfig { fabric, token })
    }

    pub async fn connect(&self) -> Result<Client> {
        let cfg = self.resolve()?;
        Ok(Client::connect(&cfg).await?)
    }
}

/// A single-threaded runtime for client commands.
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}
