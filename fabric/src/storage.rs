//! Persistence behind a small trait: named tables of string keys and byte values, changed only
//! by atomic, durable batches. The fabric keeps its state in memory and writes every change
//! through here before acknowledging it; [`RedbStorage`] is the embedded default, and an
//! etcd-backed implementation can slot in for an HA deployment.

use std::path::Path;

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: String,
    },
}

/// The tables of the fabric's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Meta,
    Plans,
    Budgets,
    Endpoints,
    Nodes,
    Leases,
    Tokens,
    /// Recent events by zero-padded revision, for subscribers that resume.
    Events,
    Assignments,
    Instances,
}

impl Table {
    pub const ALL: [Table; 10] = [
        Table::Assignments,
        Table::Instances,
        Table::Meta,
        Table::Plans,
        Table::Budgets,
        Table::Endpoints,
        Table::Nodes,
        Table::Leases,
        Table::Tokens,
        Table::Events,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Plans => "plans",
            Table::Budgets => "budgets",
            Table::Endpoints => "endpoints",
            Table::Nodes => "nodes",
            Table::Leases => "leases",
            Table::Tokens => "tokens",
            Table::Events => "events",
            Table::Assignments => "assignments",
            Table::Instances => "instances",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StorageError(pub String);

/// Durable storage of the fabric's tables.
pub trait Storage: Send + 'static {
    /// Every row of a table, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError>;
    /// Applies all changes atomically; returns only once they are durable.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StorageError>;
}

/// The embedded store: one redb file, fsynced on every commit.
pub struct RedbStorage {
    db: redb::Database,
}

fn def(t: Table) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    redb::TableDefinition::new(t.name())
}

fn err(e: impl std::fmt::Display) -> StorageError {
    StorageError(e.to_string())
}

impl RedbStorage {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = redb::Database::create(path)
            .map_err(|e| StorageError(format!("{}: {e}", path.display())))?;
        // Create every table up front so that reads never meet a missing one.
        let tx = db.begin_write().map_err(err)?;
        for t in Table::ALL {
            tx.open_table(def(t)).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(RedbStorage { db })
    }
}

impl Storage for RedbStorage {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        use redb::ReadableTable;
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(def(table)).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StorageError> {
        if changes.is_empty() {
            return Ok(());
        }
        // Durability::Immediate is redb's default: commit returns after fsync.
        let tx = self.db.begin_write().map_err(err)?;
        for c in changes {
            match c {
                Change::Put { table, key, value } => {
                    let mut t = tx.open_table(def(*table)).map_err(err)?;
                    t.insert(key.as_str(), value.as_slice()).map_err(err)?;
                }
                Change::Delete { table, key } => {
                    let mut t = tx.open_table(def(*table)).map_err(err)?;
                    t.remove(key.as_str()).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }
}

/// Storage in memory, for unit tests of the state machine.
#[derive(Default)]
pub struct MemoryStorage {
    tables: std::collections::HashMap<Table, std::collections::BTreeMap<String, Vec<u8>>>,
}

impl Storage for MemoryStorage {
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(self
            .tables
            .get(&table)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StorageError> {
        for c in changes {
            match c {
                Change::Put { table, key, value } => {
                    self.tables
                        .entry(*table)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                Change::Delete { table, key } => {
                    self.tables.entry(*table).or_default().remove(key);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_commits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fabric.redb");
        {
            let mut s = RedbStorage::open(&path).unwrap();
            s.commit(&[
                Change::Put {
                    table: Table::Plans,
                    key: "b".into(),
                    value: b"2".to_vec(),
                },
                Change::Put {
                    table: Table::Plans,
                    key: "a".into(),
                    value: b"1".to_vec(),
                },
                Change::Put {
                    table: Table::Meta,
                    key: "rev".into(),
                    value: b"9".to_vec(),
                },
            ])
            .unwrap();
            s.commit(&[Change::Delete {
                table: Table::Plans,
                key: "b".into(),
            }])
            .unwrap();
        }
        let s = RedbStorage::open(&path).unwrap();
        assert_eq!(
            s.scan(Table::Plans).unwrap(),
            vec![("a".to_string(), b"1".to_vec())]
        );
        assert_eq!(s.scan(Table::Meta).unwrap().len(), 1);
        assert!(s.scan(Table::Events).unwrap().is_empty());
    }
}
