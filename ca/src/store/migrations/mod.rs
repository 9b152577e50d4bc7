//! Versioned schema migrations, one list per engine, applied in order on
//! start (and alone by `moat ca migrate`). Each engine records what it
//! applied in `moat_schema`; the two lists are numbered alike, so "schema
//! version N" means the same tables on both.

/// One migration: its version, a name, and its SQL.
pub(crate) struct Migration {
    /// Applied in increasing order, each once.
    pub version: i64,
    /// For `moat_schema` and messages.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

/// SQLite's migrations.
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "shared_state",
        sql: include_str!("sqlite/0002_shared_state.sql"),
    },
];

/// PostgreSQL's migrations.
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "shared_state",
        sql: include_str!("postgres/0002_shared_state.sql"),
    },
];

/// The schema version this binary brings a store to.
pub(crate) const LATEST: i64 = 2;

/// The bookkeeping table, the same on both engines.
pub(crate) const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS moat_schema (
    version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";
