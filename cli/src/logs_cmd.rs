//! `mesh logs APP [-f]`: the output of an app's instances on this node.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use mesh_agent::logs;

/// Where `mesh agent` keeps its state unless told otherwise.
pub const DEFAULT_STATE: &str = "/var/lib/mesh/agent";

#[derive(Args)]
pub struct LogsCmd {
    /// The app whose instances' output to show.
    app: String,
    /// Only this instance.
    #[arg(long)]
    instance: Option<String>,
    /// Keep printing new output (follows rotation, and instances that start later).
    #[arg(short, long)]
    follow: bool,
    /// The agent's state directory.
    #[arg(long, default_value = DEFAULT_STATE, env = "MESH_AGENT_STATE", value_name = "DIR")]
    state: PathBuf,
}

fn instance_logs(state: &Path, app: &str, only: Option<&str>) -> BTreeMap<String, PathBuf> {
    let dir = state.join("logs").join(app);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join(logs::LOG_NAME).is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().join(logs::LOG_NAME),
            )
        })
        .filter(|(name, _)| only.is_none_or(|o| o == name))
        .collect()
}

pub fn run(cmd: LogsCmd) -> Result<()> {
    let found = instance_logs(&cmd.state, &cmd.app, cmd.instance.as_deref());
    if found.is_empty() && !cmd.follow {
        bail!(
            "no logs of app {} under {} (is the agent's state elsewhere? pass --state DIR)",
            cmd.app,
            cmd.state.join("logs").display()
        );
    }
    let prefix = found.len() > 1 || cmd.instance.is_none() && cmd.follow;
    let mut positions: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = std::io::stdout().lock();
    loop {
        for (name, path) in instance_logs(&cmd.state, &cmd.app, cmd.instance.as_deref()) {
            let pos = positions.get(&name).copied().unwrap_or(0);
            let mut buf = Vec::new();
            let Ok(new_pos) = logs::read_new(&path, pos, &mut buf) else {
                continue;
            };
            positions.insert(name.clone(), new_pos);
            if buf.is_empty() {
                continue;
            }
            if prefix {
                for line in buf.split_inclusive(|b| *b == b'\n') {
                    out.write_all(format!("[{name}] ").as_bytes())?;
                    out.write_all(line)?;
                }
            } else {
                out.write_all(&buf)?;
            }
        }
        out.flush()?;
        if !cmd.follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
