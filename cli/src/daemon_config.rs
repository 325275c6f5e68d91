//! `mesh fabric|agent|edge --config FILE`: a TOML file whose keys are the daemon's flags
//! (`max_connections = 5000` is `--max-connections 5000`, lists repeat a flag, `true` sets a
//! switch). Flags given on the command line win over the file.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The daemons whose `--config` names a daemon config file.
const DAEMONS: [&str; 3] = ["fabric", "agent", "edge"];

/// Returns `args` with the settings of a daemon's `--config FILE` spliced in as flags (and
/// the `--config FILE` itself removed). Other commands' arguments come back unchanged.
pub fn expand(args: Vec<OsString>, cli: &clap::Command) -> Result<Vec<OsString>> {
    let Some(sub) = args.get(1).and_then(|a| a.to_str()).map(str::to_string) else {
        return Ok(args);
    };
    if !DAEMONS.contains(&sub.as_str()) {
        return Ok(args);
    }
    let Some(subcmd) = cli.find_subcommand(&sub) else {
        return Ok(args);
    };
    let mut file = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--config") => match it.next() {
                Some(f) => file = Some(f),
                None => bail!("--config needs a FILE"),
            },
            Some(s) if s.starts_with("--config=") => file = Some(OsString::from(&s[9..])),
            _ => rest.push(a),
        }
    }
    let Some(file) = file else {
        return Ok(rest);
    };
    let path = Path::new(&file);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("mesh {sub}: config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("mesh {sub}: config file {}", path.display()))?;
    let known: Vec<String> = subcmd
        .get_arguments()
        .chain(cli.get_arguments())
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| l != "config" && l != "help")
        .collect();
    for (key, value) in table {
        let long = key.replace('_', "-");
        if !known.contains(&long) {
            bail!(
                "mesh {sub}: config file {}: unknown setting `{key}` (settings are the flags of `mesh {sub} --help`: {})",
                path.display(),
                known.join(", ")
            );
        }
        let flag = format!("--{long}");
        let given = rest.iter().any(|a| {
            a.to_str()
                .is_some_and(|s| s == flag || s.starts_with(&format!("{flag}=")))
        });
        if given {
            continue;
        }
        let values = match value {
            toml::Value::Array(items) => items,
            v => vec![v],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) => rest.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => rest.extend([flag.clone().into(), s.into()]),
                toml::Value::Integer(n) => rest.extend([flag.clone().into(), n.to_string().into()]),
                toml::Value::Float(x) => rest.extend([flag.clone().into(), x.to_string().into()]),
                other => bail!(
                    "mesh {sub}: config file {}: `{key}` must be a string, number, boolean or a list of them, not {}",
                    path.display(),
                    other.type_str()
                ),
            }
        }
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cli() -> Command {
        Command::new("mesh").subcommand(
            Command::new("edge")
                .arg(Arg::new("listen").long("listen").action(ArgAction::Append))
                .arg(Arg::new("threads").long("threads"))
                .arg(
                    Arg::new("no-ebpf")
                        .long("no-ebpf")
                        .action(ArgAction::SetTrue),
                )
                .arg(Arg::new("config").long("config")),
        )
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn settings_become_flags_and_the_command_line_wins() {
        let f = file("listen = [\"127.0.0.1:1\", \"[::1]:1\"]\nthreads = 4\nno_ebpf = true\n");
        let p = f.path().to_str().unwrap();
        let out = expand(
            args(&["mesh", "edge", "--config", p, "--threads", "2"]),
            &cli(),
        )
        .unwrap();
        assert_eq!(
            out,
            args(&[
                "mesh",
                "edge",
                "--threads",
                "2",
                "--listen",
                "127.0.0.1:1",
                "--listen",
                "[::1]:1",
                "--no-ebpf"
            ])
        );
    }

    #[test]
    fn unknown_settings_are_refused_by_name() {
        let f = file("thread = 4\n");
        let p = f.path().to_str().unwrap();
        let e = expand(args(&["mesh", "edge", "--config", p]), &cli()).unwrap_err();
        assert!(e.to_string().contains("unknown setting `thread`"), "{e}");
    }

    #[test]
    fn the_shipped_configs_parse_as_the_real_commands() {
        use clap::{CommandFactory, Parser};
        for daemon in DAEMONS {
            let file = format!("{}/../ops/config/{daemon}.toml", env!("CARGO_MANIFEST_DIR"));
            let argv = expand(
                args(&["mesh", daemon, "--config", &file]),
                &crate::Cli::command(),
            )
            .unwrap();
            assert!(argv.len() > 4, "{argv:?}");
            if let Err(e) = crate::Cli::try_parse_from(&argv) {
                panic!("{file}: {e}");
            }
        }
    }

    #[test]
    fn other_commands_are_untouched() {
        let a = args(&["mesh", "ps", "--config", "x.toml"]);
        assert_eq!(expand(a.clone(), &cli()).unwrap(), a);
    }
}
