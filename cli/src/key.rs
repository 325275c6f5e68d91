//! `mesh key`: create signing keys and print key ids.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mesh_common::keys::SecretKey;
use mesh_common::trust::TrustStore;

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an Ed25519 key pair: DIR/mesh.key (secret, mode 0600) and DIR/mesh.pub.
    ///
    /// mesh.pub is a one-line trusted-keys file: hand it to the nodes that should run what
    /// this key signs (`--trust mesh.pub`, or append it to their trusted-keys file).
    Gen {
        /// Directory to write mesh.key and mesh.pub into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Comment stored in mesh.pub, e.g. who owns the key.
        #[arg(long, default_value = "")]
        comment: String,
        /// Replace an existing key pair in DIR (the old secret key is lost).
        #[arg(long)]
        force: bool,
    },
    /// Print the key id of a secret key, public key or every key of a trusted-keys file.
    Id {
        /// mesh.key, mesh.pub or a trusted-keys file.
        file: PathBuf,
    },
}

pub fn run(cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Gen {
            out,
            comment,
            force,
        } => {
            let key = SecretKey::generate();
            let (secret, public) = key.write_pair(&out, &comment, force)?;
            println!("key {} created", key.id());
            println!(
                "  secret: {} (mode 0600, keep it private)",
                secret.display()
            );
            println!(
                "  public: {} (a trusted-keys file: give it to the nodes)",
                public.display()
            );
            Ok(())
        }
        KeyCommand::Id { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            if text.trim_start().starts_with("mesh-secret-key") {
                let key = SecretKey::load(&file)?;
                println!("{}", key.id());
                return Ok(());
            }
            let mut store = TrustStore::new();
            store.merge_text(&text, &file)?;
            let keys: Vec<_> = store.keys().collect();
            if keys.is_empty() {
                bail!(
                    "{}: holds no key (want a mesh.key, mesh.pub or trusted-keys file)",
                    file.display()
                );
            }
            if let [one] = keys.as_slice() {
                println!("{}", one.key.id());
            } else {
                for k in keys {
                    println!("{} {}", k.key.id(), k.comment);
                }
            }
            Ok(())
        }
    }
}
