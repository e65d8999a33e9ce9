//! The authorizer: what a statement may do, decided while SQLite prepares it, before the
//! statement exists.
//!
//! Reads are allowed; writes, schema changes, ATTACH, transactions and extension loading are
//! not. Two kinds of statement need more than a list of actions:
//!
//! - Virtual tables with shadow tables (R*Tree, FTS3/4, FTS5) prepare their own statements
//!   when a query first touches them, INSERT and DELETE on their shadow tables included
//!   (rt_node, ft_data, ...), and fail to connect when one is denied. Those writes are let
//!   through for shadow tables only: a prepared statement writes nothing until it runs, the
//!   module runs them only for a write to the virtual table itself (denied here), and the user's
//!   own statement must still be read-only (`sqlite3_stmt_readonly`, checked in db.rs), with
//!   `query_only` and the immutable read-only open behind that. The first such write is
//!   recorded, so a user's `INSERT INTO rt_node ...` is refused with a reason that names it.
//! - Pragmas are classified from SQLite's own list (`PRAGMA pragma_list`, every name of it
//!   checked by the tests): those that read are allowed, settings only without a value, and
//!   those that act (checkpoint, vacuum, optimize, shrink memory) never.

use std::collections::HashSet;

use rusqlite::hooks::{AuthAction, AuthContext};

/// What a pragma does, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PragmaKind {
    /// Only reads; a value is an argument (a table, a row limit) or ignored.
    Reads,
    /// Reads a setting without a value, changes it with one: the database file (user_version,
    /// journal_mode, ...) or the pooled connection's state (query_only, cache_size, ...).
    Setting,
    /// Does something whatever the value: writes the file or changes the connection.
    Acts,
}

/// Every pragma of the bundled SQLite's `PRAGMA pragma_list`, sorted by name.
/// <https://sqlite.org/pragma.html> describes each.
pub(crate) const PRAGMAS: &[(&str, PragmaKind)] = &[
    ("analysis_limit", PragmaKind::Setting),
    ("application_id", PragmaKind::Setting),
    ("auto_vacuum", PragmaKind::Setting),
    ("automatic_index", PragmaKind::Setting),
    ("busy_timeout", PragmaKind::Setting),
    ("cache_size", PragmaKind::Setting),
    ("cache_spill", PragmaKind::Setting),
    // Only sets (LIKE's case sensitivity, for the connection); it has no reading form.
    ("case_sensitive_like", PragmaKind::Acts),
    ("cell_size_check", PragmaKind::Setting),
    ("checkpoint_fullfsync", PragmaKind::Setting),
    ("collation_list", PragmaKind::Reads),
    ("compile_options", PragmaKind::Reads),
    ("count_changes", PragmaKind::Setting),
    // Read-only header fields: SQLite ignores a value.
    ("data_version", PragmaKind::Reads),
    ("database_list", PragmaKind::Reads),
    ("default_cache_size", PragmaKind::Setting),
    ("defer_foreign_keys", PragmaKind::Setting),
    ("empty_result_callbacks", PragmaKind::Setting),
    ("encoding", PragmaKind::Setting),
    ("foreign_key_check", PragmaKind::Reads),
    ("foreign_key_list", PragmaKind::Reads),
    ("foreign_keys", PragmaKind::Setting),
    ("freelist_count", PragmaKind::Reads),
    ("full_column_names", PragmaKind::Setting),
    ("fullfsync", PragmaKind::Setting),
    ("function_list", PragmaKind::Reads),
    // Process-wide, so setting it would change every connection.
    ("hard_heap_limit", PragmaKind::Setting),
    ("ignore_check_constraints", PragmaKind::Setting),
    ("incremental_vacuum", PragmaKind::Acts),
    ("index_info", PragmaKind::Reads),
    ("index_list", PragmaKind::Reads),
    ("index_xinfo", PragmaKind::Reads),
    // A value is a row limit or a table name.
    ("integrity_check", PragmaKind::Reads),
    ("journal_mode", PragmaKind::Setting),
    ("journal_size_limit", PragmaKind::Setting),
    ("legacy_alter_table", PragmaKind::Setting),
    ("locking_mode", PragmaKind::Setting),
    ("max_page_count", PragmaKind::Setting),
    ("mmap_size", PragmaKind::Setting),
    ("module_list", PragmaKind::Reads),
    // Runs ANALYZE where it thinks it helps: writes sqlite_stat1.
    ("optimize", PragmaKind::Acts),
    ("page_count", PragmaKind::Reads),
    ("page_size", PragmaKind::Setting),
    ("pragma_list", PragmaKind::Reads),
    ("query_only", PragmaKind::Setting),
    ("quick_check", PragmaKind::Reads),
    ("read_uncommitted", PragmaKind::Setting),
    ("recursive_triggers", PragmaKind::Setting),
    ("reverse_unordered_selects", PragmaKind::Setting),
    ("schema_version", PragmaKind::Setting),
    ("secure_delete", PragmaKind::Setting),
    ("short_column_names", PragmaKind::Setting),
    // Frees the connection's page cache: the next queries on it run cold.
    ("shrink_memory", PragmaKind::Acts),
    ("soft_heap_limit", PragmaKind::Setting),
    ("synchronous", PragmaKind::Setting),
    ("table_info", PragmaKind::Reads),
    ("table_list", PragmaKind::Reads),
    ("table_xinfo", PragmaKind::Reads),
    ("temp_store", PragmaKind::Setting),
    ("temp_store_directory", PragmaKind::Setting),
    ("threads", PragmaKind::Setting),
    ("trusted_schema", PragmaKind::Setting),
    ("user_version", PragmaKind::Setting),
    ("wal_autocheckpoint", PragmaKind::Setting),
    ("wal_checkpoint", PragmaKind::Acts),
    ("writable_schema", PragmaKind::Setting),
];

/// What a pragma does; None for a name SQLite's list does not have (denied).
pub fn pragma_kind(name: &str) -> Option<PragmaKind> {
    let name = name.to_ascii_lowercase();
    PRAGMAS
        .binary_search_by(|(n, _)| n.cmp(&name.as_str()))
        .ok()
        .map(|i| PRAGMAS[i].1)
}

/// Pragmas whose reading form `sqlite3_stmt_readonly` calls a writer: `PRAGMA journal_mode`
/// compiles to OP_JournalMode, which marks the statement as writing even when it only asks.
pub const READS_THOUGH_NOT_STMT_READONLY: &[&str] = &["journal_mode"];

/// What the authorizer saw while one statement was prepared; reset before each statement.
#[derive(Default, Debug)]
pub struct Log {
    /// Why it said no (SQLite stops at the first denial, so there is one).
    pub denied: Option<String>,
    /// The first write to a shadow table it let through, as a reason for the 403 when the
    /// statement turns out not to be read-only.
    pub shadow_write: Option<String>,
    /// The statement's first action was this pragma, allowed as a read (lower case).
    pub first_pragma_read: Option<String>,
    actions: usize,
}

/// The decisions, and the shadow tables of this database (schema, lower-case name).
pub struct Policy {
    shadow_tables: HashSet<(String, String)>,
}

impl Policy {
    /// `shadow_tables`: (schema, name) of every table `PRAGMA table_list` calls 'shadow'.
    pub fn new(shadow_tables: impl IntoIterator<Item = (String, String)>) -> Policy {
        Policy {
            shadow_tables: shadow_tables
                .into_iter()
                .map(|(schema, name)| (schema.to_ascii_lowercase(), name.to_ascii_lowercase()))
                .collect(),
        }
    }

    fn is_shadow(&self, database: Option<&str>, table: &str) -> bool {
        let key = (
            database.unwrap_or("main").to_ascii_lowercase(),
            table.to_ascii_lowercase(),
        );
        self.shadow_tables.contains(&key)
    }

    /// Ok to allow, Err(reason) to deny; notes what db.rs needs to know in `log`.
    pub fn check(&self, ctx: &AuthContext<'_>, log: &mut Log) -> Result<(), String> {
        let first = log.actions == 0;
        log.actions += 1;
        let write = match ctx.action {
            AuthAction::Insert { table_name } => Some(format!("INSERT into {table_name}")),
            AuthAction::Update { table_name, .. } => Some(format!("UPDATE of {table_name}")),
            AuthAction::Delete { table_name } => Some(format!("DELETE from {table_name}")),
            _ => None,
        };
        if let (Some(write), Some(table)) = (write, written_table(&ctx.action))
            && self.is_shadow(ctx.database_name, table)
        {
            log.shadow_write
                .get_or_insert_with(|| format!("{write} is not allowed: {READ_ONLY}"));
            return Ok(());
        }
        let result = authorize(&ctx.action);
        if let (Ok(()), AuthAction::Pragma { pragma_name, .. }, true) =
            (&result, &ctx.action, first)
        {
            log.first_pragma_read = Some(pragma_name.to_ascii_lowercase());
        }
        if let Err(why) = &result {
            log.denied = Some(why.clone());
        }
        result
    }
}

const READ_ONLY: &str = "the database is a read-only snapshot";

fn written_table<'a>(action: &AuthAction<'a>) -> Option<&'a str> {
    match *action {
        AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name } => Some(table_name),
        _ => None,
    }
}

fn authorize_pragma(name: &str, value: Option<&str>) -> Result<(), String> {
    let shown = match value {
        Some(v) => format!("PRAGMA {name} = {v}"),
        None => format!("PRAGMA {name}"),
    };
    match (pragma_kind(name), value) {
        (Some(PragmaKind::Reads), _) | (Some(PragmaKind::Setting), None) => Ok(()),
        (Some(PragmaKind::Setting), Some(_)) => Err(format!(
            "{shown} is not allowed: it changes a setting, and only pragmas that read are allowed (PRAGMA {name} without a value reads it)"
        )),
        (Some(PragmaKind::Acts), _) => Err(format!(
            "{shown} is not allowed: only pragmas that read are allowed"
        )),
        (None, _) => Err(format!(
            "{shown} is not allowed: SQLite's pragma list does not have it, and only pragmas that read are allowed"
        )),
    }
}

/// Allowed, or why not, as a sentence: the reason goes to the client as it is, so every
/// action SQLite may ask about is named in words (never as Rust's Debug text).
fn authorize(action: &AuthAction<'_>) -> Result<(), String> {
    match *action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Recursive => Ok(()),
        AuthAction::Function { function_name } => {
            let name = function_name.to_ascii_lowercase();
            if name == "load_extension" || name == "readfile" || name == "writefile" {
                Err(format!(
                    "function {function_name}() is not allowed: it reads or writes files or loads code"
                ))
            } else {
                Ok(())
            }
        }
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => authorize_pragma(pragma_name, pragma_value),
        AuthAction::Attach { filename } => Err(format!(
            "ATTACH '{filename}' is not allowed: only the snapshot can be read"
        )),
        AuthAction::Detach { database_name } => Err(format!(
            "DETACH {database_name} is not allowed: nothing can be attached, so nothing can be detached"
        )),
        // CREATE, DROP and ALTER first ask to change the schema table, and SQLite stops at
        // the first denial.
        AuthAction::Insert { table_name }
        | AuthAction::Update { table_name, .. }
        | AuthAction::Delete { table_name }
            if table_name == "sqlite_master" || table_name == "sqlite_temp_master" =>
        {
            Err(format!("changing the schema ({table_name})"))
        }
        AuthAction::Insert { table_name } => Err(format!("INSERT into {table_name}")),
        AuthAction::Update { table_name, .. } => Err(format!("UPDATE of {table_name}")),
        AuthAction::Delete { table_name } => Err(format!("DELETE from {table_name}")),
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => {
            Err("transactions are not needed: every query reads one immutable snapshot".into())
        }
        AuthAction::CreateTable { table_name } => Err(format!("CREATE TABLE {table_name}")),
        AuthAction::CreateTempTable { table_name } => {
            Err(format!("CREATE TEMP TABLE {table_name}"))
        }
        AuthAction::CreateIndex { index_name, .. } => Err(format!("CREATE INDEX {index_name}")),
        AuthAction::CreateTempIndex { index_name, .. } => {
            Err(format!("CREATE TEMP INDEX {index_name}"))
        }
        AuthAction::CreateView { view_name } => Err(format!("CREATE VIEW {view_name}")),
        AuthAction::CreateTempView { view_name } => Err(format!("CREATE TEMP VIEW {view_name}")),
        AuthAction::CreateTrigger { trigger_name, .. } => {
            Err(format!("CREATE TRIGGER {trigger_name}"))
        }
        AuthAction::CreateTempTrigger { trigger_name, .. } => {
            Err(format!("CREATE TEMP TRIGGER {trigger_name}"))
        }
        AuthAction::CreateVtable {
            table_name,
            module_name,
        } => Err(format!(
            "CREATE VIRTUAL TABLE {table_name} USING {module_name}"
        )),
        AuthAction::DropTable { table_name } | AuthAction::DropTempTable { table_name } => {
            Err(format!("DROP TABLE {table_name}"))
        }
        AuthAction::DropIndex { index_name, .. } | AuthAction::DropTempIndex { index_name, .. } => {
            Err(format!("DROP INDEX {index_name}"))
        }
        AuthAction::DropView { view_name } | AuthAction::DropTempView { view_name } => {
            Err(format!("DROP VIEW {view_name}"))
        }
        AuthAction::DropTrigger { trigger_name, .. }
        | AuthAction::DropTempTrigger { trigger_name, .. } => {
            Err(format!("DROP TRIGGER {trigger_name}"))
        }
        AuthAction::DropVtable { table_name, .. } => {
            Err(format!("DROP of virtual table {table_name}"))
        }
        AuthAction::AlterTable { table_name, .. } => Err(format!("ALTER TABLE {table_name}")),
        AuthAction::Reindex { index_name } => Err(format!("REINDEX {index_name}")),
        // ANALYZE writes its statistics into sqlite_stat1 (and stat4).
        AuthAction::Analyze { table_name } => Err(format!("ANALYZE {table_name}")),
        AuthAction::Unknown { code, .. } => Err(format!(
            "an operation this SQLite numbers {code} (not one bakedb-serve knows to be a read)"
        )),
        // AuthAction is non_exhaustive: an action a newer rusqlite adds is refused until it
        // is known to be a read.
        _ => Err("an operation bakedb-serve does not know to be a read".into()),
    }
    .map_err(|what| {
        if what.contains("not allowed") || what.contains("not needed") {
            what
        } else {
            format!("{what} is not allowed: {READ_ONLY}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pragma_table_is_sorted_so_binary_search_finds_every_name() {
        assert!(PRAGMAS.windows(2).all(|w| w[0].0 < w[1].0));
        for (name, kind) in PRAGMAS {
            assert_eq!(pragma_kind(name), Some(*kind), "{name}");
            assert_eq!(pragma_kind(&name.to_uppercase()), Some(*kind), "{name}");
        }
        assert_eq!(pragma_kind("no_such_pragma"), None);
    }

    /// Every action rusqlite names, with the sentence the client reads when it is refused:
    /// words with the object's name, never Rust's Debug form (`Analyze { table_name: .. }`).
    #[test]
    fn every_refused_action_is_explained_in_a_sentence() {
        use rusqlite::hooks::TransactionOperation;
        let (t, i, v, g, m) = ("items", "items_name", "cheap", "audit", "fts5");
        let cases = [
            (
                AuthAction::CreateIndex {
                    index_name: i,
                    table_name: t,
                },
                "CREATE INDEX items_name is not allowed: the database is a read-only snapshot",
            ),
            (
                AuthAction::CreateTable { table_name: t },
                "CREATE TABLE items is not allowed",
            ),
            (
                AuthAction::CreateTempIndex {
                    index_name: i,
                    table_name: t,
                },
                "CREATE TEMP INDEX items_name is not allowed",
            ),
            (
                AuthAction::CreateTempTable { table_name: t },
                "CREATE TEMP TABLE items is not allowed",
            ),
            (
                AuthAction::CreateTempTrigger {
                    trigger_name: g,
                    table_name: t,
                },
                "CREATE TEMP TRIGGER audit is not allowed",
            ),
            (
                AuthAction::CreateTempView { view_name: v },
                "CREATE TEMP VIEW cheap is not allowed",
            ),
            (
                AuthAction::CreateTrigger {
                    trigger_name: g,
                    table_name: t,
                },
                "CREATE TRIGGER audit is not allowed",
            ),
            (
                AuthAction::CreateView { view_name: v },
                "CREATE VIEW cheap is not allowed",
            ),
            (
                AuthAction::Delete { table_name: t },
                "DELETE from items is not allowed",
            ),
            (
                AuthAction::DropIndex {
                    index_name: i,
                    table_name: t,
                },
                "DROP INDEX items_name is not allowed",
            ),
            (
                AuthAction::DropTable { table_name: t },
                "DROP TABLE items is not allowed",
            ),
            (
                AuthAction::DropTempIndex {
                    index_name: i,
                    table_name: t,
                },
                "DROP INDEX items_name is not allowed",
            ),
            (
                AuthAction::DropTempTable { table_name: t },
                "DROP TABLE items is not allowed",
            ),
            (
                AuthAction::DropTempTrigger {
                    trigger_name: g,
                    table_name: t,
                },
                "DROP TRIGGER audit is not allowed",
            ),
            (
                AuthAction::DropTempView { view_name: v },
                "DROP VIEW cheap is not allowed",
            ),
            (
                AuthAction::DropTrigger {
                    trigger_name: g,
                    table_name: t,
                },
                "DROP TRIGGER audit is not allowed",
            ),
            (
                AuthAction::DropView { view_name: v },
                "DROP VIEW cheap is not allowed",
            ),
            (
                AuthAction::Insert { table_name: t },
                "INSERT into items is not allowed",
            ),
            (
                AuthAction::Pragma {
                    pragma_name: "user_version",
                    pragma_value: Some("7"),
                },
                "PRAGMA user_version = 7 is not allowed",
            ),
            (
                AuthAction::Transaction {
                    operation: TransactionOperation::Begin,
                },
                "transactions are not needed",
            ),
            (
                AuthAction::Update {
                    table_name: t,
                    column_name: "name",
                },
                "UPDATE of items is not allowed",
            ),
            (
                AuthAction::Attach {
                    filename: "/tmp/x.db",
                },
                "ATTACH '/tmp/x.db' is not allowed: only the snapshot can be read",
            ),
            (
                AuthAction::Detach { database_name: "x" },
                "DETACH x is not allowed",
            ),
            (
                AuthAction::AlterTable {
                    database_name: "main",
                    table_name: t,
                },
                "ALTER TABLE items is not allowed",
            ),
            (
                AuthAction::Reindex { index_name: i },
                "REINDEX items_name is not allowed: the database is a read-only snapshot",
            ),
            (
                AuthAction::Analyze { table_name: t },
                "ANALYZE items is not allowed: the database is a read-only snapshot",
            ),
            (
                AuthAction::CreateVtable {
                    table_name: "docs",
                    module_name: m,
                },
                "CREATE VIRTUAL TABLE docs USING fts5 is not allowed",
            ),
            (
                AuthAction::DropVtable {
                    table_name: "docs",
                    module_name: m,
                },
                "DROP of virtual table docs is not allowed",
            ),
            (
                AuthAction::Function {
                    function_name: "load_extension",
                },
                "function load_extension() is not allowed",
            ),
            (
                AuthAction::Savepoint {
                    operation: TransactionOperation::Begin,
                    savepoint_name: "s",
                },
                "transactions are not needed",
            ),
            (
                AuthAction::Unknown {
                    code: 99,
                    arg1: Some("x"),
                    arg2: None,
                },
                "an operation this SQLite numbers 99 (not one bakedb-serve knows to be a read) is not allowed",
            ),
        ];
        for (action, want) in cases {
            let why = authorize(&action).expect_err(want);
            assert!(why.starts_with(want), "{action:?}: {why}");
            assert!(
                !why.contains('{') && !why.contains("name:") && !why.contains('"'),
                "{action:?} is explained with Debug text: {why}"
            );
        }
        for allowed in [
            AuthAction::Select,
            AuthAction::Recursive,
            AuthAction::Read {
                table_name: t,
                column_name: "name",
            },
            AuthAction::Function {
                function_name: "json_extract",
            },
            AuthAction::Pragma {
                pragma_name: "table_info",
                pragma_value: Some(t),
            },
        ] {
            assert_eq!(authorize(&allowed), Ok(()), "{allowed:?}");
        }
    }
}
