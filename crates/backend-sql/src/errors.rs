//! Database errors mapped to runstate's portable kinds: exactly one
//! function per database, with the codes named.

use runstate_core::{Error, ErrorKind};

use crate::config::Dialect;

/// PostgreSQL SQLSTATE codes.
mod postgres {
    pub const UNIQUE_VIOLATION: &str = "23505";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// A lock wait outlived `lock_timeout` (or `NOWAIT`).
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CRASH_SHUTDOWN: &str = "57P02";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `idle_session_timeout` ended the session (PostgreSQL 14+).
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// `idle_in_transaction_session_timeout` ended the session.
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const UNDEFINED_TABLE: &str = "42P01";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    /// Class 08: connection exceptions.
    pub const CONNECTION_EXCEPTION_CLASS: &str = "08";
}

/// MySQL / MariaDB error numbers.
mod mysql {
    pub const ER_DUP_ENTRY: u16 = 1062;
    pub const ER_LOCK_DEADLOCK: u16 = 1213;
    pub const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// MySQL's `max_execution_time` exceeded.
    pub const ER_QUERY_TIMEOUT: u16 = 3024;
    /// MariaDB's `max_statement_time` exceeded.
    pub const ER_STATEMENT_TIMEOUT: u16 = 1969;
    pub const ER_QUERY_INTERRUPTED: u16 = 1317;
    pub const ER_NO_SUCH_TABLE: u16 = 1146;
    pub const ER_SP_DOES_NOT_EXIST: u16 = 1305;
    pub const ER_ACCESS_DENIED: u16 = 1045;
    pub const ER_DBACCESS_DENIED: u16 = 1044;
    pub const ER_TABLEACCESS_DENIED: u16 = 1142;
    pub const ER_NET_PACKET_TOO_LARGE: u16 = 1153;
    pub const ER_CON_COUNT_ERROR: u16 = 1040;
    pub const ER_SERVER_SHUTDOWN: u16 = 1053;
    /// The server aborted the connection (a network error, a dying thread).
    pub const ER_ABORTING_CONNECTION: u16 = 1152;
    pub const ER_NEW_ABORTING_CONNECTION: u16 = 1184;
    /// MariaDB: the session was killed (`KILL CONNECTION`).
    pub const ER_CONNECTION_KILLED: u16 = 1927;
    /// MySQL 8.0.24+: the session outlived `wait_timeout` and was closed.
    pub const ER_CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
    /// "MySQL server has gone away" and "Lost connection to MySQL server
    /// during query": client library codes, which proxies (ProxySQL,
    /// MaxScale) relay as server errors.
    pub const CR_SERVER_GONE_ERROR: u16 = 2006;
    pub const CR_SERVER_LOST: u16 = 2013;
}

/// SQLite result codes (primary and extended).
mod sqlite {
    /// The generic error; "no such table" is one.
    pub const SQLITE_ERROR: i32 = 1;
    pub const SQLITE_BUSY: i32 = 5;
    pub const SQLITE_LOCKED: i32 = 6;
    pub const SQLITE_TOOBIG: i32 = 18;
    pub const SQLITE_CONSTRAINT_PRIMARYKEY: i32 = 1555;
    pub const SQLITE_CONSTRAINT_UNIQUE: i32 = 2067;
    pub const SQLITE_READONLY: i32 = 8;
    pub const SQLITE_FULL: i32 = 13;
}

/// What a database error means, portably.
struct Meaning {
    kind: ErrorKind,
    retryable: bool,
    /// Whether the server ended the session with it (PostgreSQL's FATAL).
    ends_session: bool,
    /// A transaction conflict (a deadlock, a serialization failure, a lock
    /// wait that timed out, a busy database): the statement or transaction
    /// was rolled back, so sending it again cannot make it twice. Unlike
    /// an error that ended the session, after which a `COMMIT` may or may
    /// not have been made.
    conflict: bool,
    what: &'static str,
}

const fn meaning(kind: ErrorKind, retryable: bool, what: &'static str) -> Meaning {
    Meaning {
        kind,
        retryable,
        ends_session: false,
        conflict: false,
        what,
    }
}

/// A transaction conflict (see [`Meaning::conflict`]): retryable.
const fn conflict(what: &'static str) -> Meaning {
    Meaning {
        kind: ErrorKind::Backend,
        retryable: true,
        ends_session: false,
        conflict: true,
        what,
    }
}

fn postgres_meaning(code: &str) -> Meaning {
    use postgres::*;
    match code {
        UNIQUE_VIOLATION => meaning(ErrorKind::AlreadyExists, false, "the row already exists"),
        SERIALIZATION_FAILURE | DEADLOCK_DETECTED => conflict("transaction conflict"),
        LOCK_NOT_AVAILABLE => conflict("a lock wait timed out"),
        QUERY_CANCELED => meaning(ErrorKind::Timeout, true, "statement timed out"),
        ADMIN_SHUTDOWN
        | CRASH_SHUTDOWN
        | CANNOT_CONNECT_NOW
        | TOO_MANY_CONNECTIONS
        | IDLE_SESSION_TIMEOUT
        | IDLE_IN_TRANSACTION_SESSION_TIMEOUT => meaning(
            ErrorKind::Backend,
            true,
            "the server ended or refused the connection",
        ),
        UNDEFINED_TABLE => meaning(
            ErrorKind::Config,
            false,
            "runstate's tables are missing (run the migrations)",
        ),
        INSUFFICIENT_PRIVILEGE => meaning(ErrorKind::Denied, false, "permission denied"),
        INVALID_PASSWORD | INVALID_AUTHORIZATION => meaning(
            ErrorKind::Config,
            false,
            "the server refused the credentials",
        ),
        INVALID_CATALOG_NAME => meaning(ErrorKind::Config, false, "no such database"),
        PROGRAM_LIMIT_EXCEEDED => {
            meaning(ErrorKind::TooLarge, false, "a server limit was exceeded")
        }
        c if c.starts_with(CONNECTION_EXCEPTION_CLASS) => {
            meaning(ErrorKind::Backend, true, "connection failure")
        }
        _ => meaning(ErrorKind::Backend, false, "the database returned an error"),
    }
}

fn mysql_meaning(number: u16) -> Meaning {
    use mysql::*;
    match number {
        ER_DUP_ENTRY => meaning(ErrorKind::AlreadyExists, false, "the row already exists"),
        ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT => conflict("transaction conflict"),
        ER_QUERY_TIMEOUT | ER_STATEMENT_TIMEOUT | ER_QUERY_INTERRUPTED => {
            meaning(ErrorKind::Timeout, true, "statement timed out")
        }
        ER_NO_SUCH_TABLE | ER_SP_DOES_NOT_EXIST => meaning(
            ErrorKind::Config,
            false,
            "runstate's tables are missing (run the migrations)",
        ),
        ER_ACCESS_DENIED => meaning(
            ErrorKind::Config,
            false,
            "the server refused the credentials",
        ),
        ER_DBACCESS_DENIED | ER_TABLEACCESS_DENIED => {
            meaning(ErrorKind::Denied, false, "permission denied")
        }
        ER_NET_PACKET_TOO_LARGE => meaning(
            ErrorKind::TooLarge,
            false,
            "over the server's max_allowed_packet",
        ),
        ER_CON_COUNT_ERROR
        | ER_SERVER_SHUTDOWN
        | ER_ABORTING_CONNECTION
        | ER_NEW_ABORTING_CONNECTION
        | ER_CONNECTION_KILLED
        | ER_CLIENT_INTERACTION_TIMEOUT
        | CR_SERVER_GONE_ERROR
        | CR_SERVER_LOST => meaning(
            ErrorKind::Backend,
            true,
            "the server ended or refused the connection",
        ),
        _ => meaning(ErrorKind::Backend, false, "the database returned an error"),
    }
}

fn sqlite_meaning(code: i32, message: &str) -> Meaning {
    use sqlite::*;
    match code {
        SQLITE_ERROR if message.starts_with("no such table") => meaning(
            ErrorKind::Config,
            false,
            "runstate's tables are missing (run the migrations)",
        ),
        SQLITE_CONSTRAINT_PRIMARYKEY | SQLITE_CONSTRAINT_UNIQUE => {
            meaning(ErrorKind::AlreadyExists, false, "the row already exists")
        }
        c if c & 0xff == SQLITE_BUSY || c & 0xff == SQLITE_LOCKED => {
            conflict("the database is busy")
        }
        SQLITE_TOOBIG => meaning(ErrorKind::TooLarge, false, "over SQLite's size limit"),
        c if c & 0xff == SQLITE_READONLY => {
            meaning(ErrorKind::Denied, false, "the database is read-only")
        }
        SQLITE_FULL => meaning(ErrorKind::Backend, false, "the disk is full"),
        _ => meaning(ErrorKind::Backend, false, "the database returned an error"),
    }
}

/// The meaning of a database error of `dialect`, from its code.
fn database_meaning(
    dialect: Dialect,
    error: &(dyn sqlx::error::DatabaseError + 'static),
) -> Meaning {
    match dialect {
        Dialect::Postgres => {
            #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
            let mut m = postgres_meaning(error.code().as_deref().unwrap_or(""));
            #[cfg(feature = "postgres")]
            if let Some(pg) = error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                && matches!(
                    pg.severity(),
                    sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                )
            {
                // FATAL ends the session whatever its code: the connection
                // is gone, and unless the server refused who we are (bad
                // credentials, no such database), another try on a new
                // connection may succeed.
                m.ends_session = true;
                if m.kind == ErrorKind::Backend {
                    m.retryable = true;
                }
            }
            m
        }
        Dialect::MySql => {
            #[cfg(feature = "mysql")]
            if let Some(my) = error.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return mysql_meaning(my.number());
            }
            mysql_meaning(0)
        }
        Dialect::Sqlite => sqlite_meaning(
            error.code().and_then(|c| c.parse().ok()).unwrap_or(0),
            error.message(),
        ),
    }
}

/// Maps a sqlx error of `dialect` to a runstate error, keeping it as the
/// source.
pub(crate) fn map_error(dialect: Dialect, error: sqlx::Error) -> Error {
    let m = match &error {
        sqlx::Error::Database(db) => database_meaning(dialect, db.as_ref()),
        sqlx::Error::PoolTimedOut => meaning(
            ErrorKind::Timeout,
            true,
            "no pooled connection became free in time",
        ),
        sqlx::Error::PoolClosed => {
            meaning(ErrorKind::Backend, false, "the connection pool is closed")
        }
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => meaning(
            ErrorKind::Backend,
            true,
            "the connection to the database failed",
        ),
        sqlx::Error::Tls(_) => meaning(ErrorKind::Config, false, "TLS setup failed"),
        sqlx::Error::Configuration(_) => {
            meaning(ErrorKind::Config, false, "invalid database settings")
        }
        sqlx::Error::RowNotFound => meaning(ErrorKind::NotFound, false, "no such row"),
        _ => meaning(ErrorKind::Backend, false, "database request failed"),
    };
    Error::new(m.kind, m.what)
        .with_backend(dialect.name())
        .with_source(error)
        .set_retryable(m.retryable)
}

/// Whether a connection whose statement failed with `error` may be lent
/// again: only when the database answered with a refusal that does not
/// concern the connection (a duplicate key, a failed check, a missing
/// table). Anything else (I/O, protocol, a timeout, a server shutting the
/// session down) leaves it in an unknown state, so it is dropped.
pub(crate) fn leaves_connection_usable(dialect: Dialect, error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let m = database_meaning(dialect, db.as_ref());
            !m.retryable && !m.ends_session
        }
        sqlx::Error::RowNotFound => true,
        _ => false,
    }
}

/// Whether `error` (a runstate error whose source is a sqlx error of
/// `dialect`) is a transaction conflict the database answered: rolled
/// back, so the same statements may be sent again. An error that ended
/// the session is not, whatever its code: the outcome of a `COMMIT` it
/// answered is unknown.
pub(crate) fn is_transaction_conflict(dialect: Dialect, error: &Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>() {
            let m = database_meaning(dialect, db.as_ref());
            return m.conflict && !m.ends_session;
        }
        source = cause.source();
    }
    false
}

/// [`map_error`], saying what was being done.
pub(crate) fn map_error_during(dialect: Dialect, error: sqlx::Error, doing: &str) -> Error {
    let mapped = map_error(dialect, error);
    Error::new(mapped.kind(), format!("{doing}: {}", mapped.message()))
        .with_backend(dialect.name())
        .set_retryable(mapped.is_retryable())
        .with_source(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// A database error with a code, as a driver hands one over.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "injected error {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "injected"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    /// Wave-2 review: a batch group is sent again only after a transaction
    /// conflict, which rolled it back; never after an error that ended the
    /// session (an administrator's shutdown, a lost connection relayed by a
    /// proxy), which may have answered a `COMMIT` that was made: sent
    /// again, the group's creates met their own rows (`AlreadyExists`) and
    /// its updates their own versions (`Precondition`). And a lock wait
    /// that outlived `lock_timeout` (55P03) is such a conflict, retryable,
    /// where it was a permanent `Backend` error.
    #[test]
    fn only_transaction_conflicts_are_sent_again() {
        let mapped =
            |dialect, code| map_error(dialect, sqlx::Error::Database(Box::new(Coded(code))));
        for (dialect, code) in [
            (Dialect::Postgres, "40001"),
            (Dialect::Postgres, "40P01"),
            (Dialect::Postgres, "55P03"),
            (Dialect::Sqlite, "5"),
            (Dialect::Sqlite, "517"),
            (Dialect::Sqlite, "6"),
        ] {
            let error = mapped(dialect, code);
            assert!(error.is_retryable(), "{code}");
            assert!(is_transaction_conflict(dialect, &error), "{code}");
            let during =
                map_error_during(dialect, sqlx::Error::Database(Box::new(Coded(code))), "x");
            assert!(is_transaction_conflict(dialect, &during), "{code}, wrapped");
        }
        for code in [
            "57P01", "57P02", "57P05", "25P03", "08006", "23505", "57014",
        ] {
            let error = mapped(Dialect::Postgres, code);
            assert!(
                !is_transaction_conflict(Dialect::Postgres, &error),
                "{code}"
            );
        }
        assert!(!is_transaction_conflict(
            Dialect::Postgres,
            &map_error(Dialect::Postgres, sqlx::Error::PoolTimedOut)
        ));
        for number in [1213, 1205] {
            assert!(mysql_meaning(number).conflict, "{number}");
        }
        for number in [2006, 2013, 1053, 1927, 1062] {
            assert!(!mysql_meaning(number).conflict, "{number}");
        }
    }

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(postgres_meaning("23505").kind, ErrorKind::AlreadyExists);
        assert!(postgres_meaning("40001").retryable);
        assert!(postgres_meaning("08006").retryable);
        assert_eq!(postgres_meaning("57014").kind, ErrorKind::Timeout);
        assert_eq!(mysql_meaning(1062).kind, ErrorKind::AlreadyExists);
        assert!(mysql_meaning(1213).retryable);
        assert_eq!(mysql_meaning(1969).kind, ErrorKind::Timeout);
        assert_eq!(sqlite_meaning(2067, "").kind, ErrorKind::AlreadyExists);
        assert!(sqlite_meaning(517, "").retryable, "SQLITE_BUSY_SNAPSHOT");
        assert_eq!(sqlite_meaning(18, "").kind, ErrorKind::TooLarge);
        assert_eq!(
            sqlite_meaning(1, "no such table: x").kind,
            ErrorKind::Config
        );
    }

    /// Review finding: errors by which the server ends the session are
    /// retryable (a new connection may succeed), on every server.
    #[test]
    fn session_ending_errors_are_retryable() {
        for code in [
            "57P01", "57P02", "57P03", "57P05", "25P03", "08006", "08003",
        ] {
            let m = postgres_meaning(code);
            assert!(m.retryable, "{code}");
            assert_eq!(m.kind, ErrorKind::Backend, "{code}");
        }
        for number in [1053, 1152, 1184, 1927, 4031, 2006, 2013] {
            let m = mysql_meaning(number);
            assert!(m.retryable, "{number}");
            assert_eq!(m.kind, ErrorKind::Backend, "{number}");
        }
        // Refusals of who we are stay permanent.
        assert!(!postgres_meaning("28P01").retryable);
        assert_eq!(postgres_meaning("3D000").kind, ErrorKind::Config);
        assert!(!mysql_meaning(1045).retryable);
    }
}
