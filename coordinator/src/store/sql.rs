//! The query layer both backends share: one statement, written once with `$N` parameters
//! (SQLite reads `$N` as the N-th parameter too), runs on either database.
//!
//! - [`Id`] and [`Time`] encode and decode a uuid and a time on both backends: native
//!   `uuid` and `timestamptz` on PostgreSQL; on SQLite the TEXT of
//!   `migrations/sqlite/0001_initial.sql` (lowercase hyphenated uuids; RFC 3339 UTC times
//!   with exactly six fractional digits, so comparing the text compares the times).
//! - [`Arg`] is one statement parameter; [`Record`] is a row struct that derives
//!   `sqlx::FromRow` over columns of those types, so it reads the same on both backends.
//! - [`Db`] runs a statement on a pool or on a transaction's connection of either backend;
//!   [`Tx`] is a write transaction of either backend.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgRow, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{SqliteArgumentValue, SqliteRow, SqliteTypeInfo, SqliteValueRef};
use sqlx::{
    Arguments, Database, Decode, Encode, FromRow, PgConnection, PgPool, Postgres, Sqlite,
    SqliteConnection, SqlitePool, Transaction, Type,
};
use uuid::Uuid;

use super::StoreError;

/// A uuid column or parameter (`uuid` on PostgreSQL, TEXT on SQLite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Id(pub Uuid);

/// A time column or parameter (`timestamptz` on PostgreSQL, fixed-width TEXT on SQLite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Time(pub DateTime<Utc>);

/// A stored value that does not parse: decoding fails with it, and [`StoreError`] reports
/// it as [`StoreError::corrupt`] does.
#[derive(Debug, thiserror::Error)]
#[error("stored {what} {value:?} is not valid")]
pub(crate) struct Corrupt {
    what: &'static str,
    value: String,
}

/// Returns the stored text of a uuid on SQLite.
pub(crate) fn uuid_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// Returns the stored text of a time on SQLite: RFC 3339 UTC, six fractional digits.
pub(crate) fn time_text(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn parse_uuid(text: &str) -> Result<Uuid, Corrupt> {
    Uuid::parse_str(text).map_err(|_| Corrupt {
        what: "uuid",
        value: text.to_string(),
    })
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, Corrupt> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| Corrupt {
            what: "time",
            value: text.to_string(),
        })
}

impl Type<Postgres> for Id {
    fn type_info() -> PgTypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Id {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Uuid as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Id {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Id(<Uuid as Decode<Postgres>>::decode(value)?))
    }
}

impl Type<Sqlite> for Id {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <&str as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Id {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        buf.push(SqliteArgumentValue::Text(Cow::Owned(uuid_text(self.0))));
        Ok(IsNull::No)
    }
}

impl<'r> Decode<'r, Sqlite> for Id {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Id(parse_uuid(text)?))
    }
}

impl Type<Postgres> for Time {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Time {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Time {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Time(<DateTime<Utc> as Decode<Postgres>>::decode(value)?))
    }
}

impl Type<Sqlite> for Time {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <&str as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Time {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        buf.push(SqliteArgumentValue::Text(Cow::Owned(time_text(self.0))));
        Ok(IsNull::No)
    }
}

impl<'r> Decode<'r, Sqlite> for Time {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Time(parse_time(text)?))
    }
}

/// One statement parameter, bound as the same SQL type on both backends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    Id(Uuid),
    OptId(Option<Uuid>),
    Time(DateTime<Utc>),
    OptTime(Option<DateTime<Utc>>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i32),
    BigInt(i64),
    OptBigInt(Option<i64>),
    Float(f64),
    OptFloat(Option<f64>),
}

/// Builds a statement's arguments for either backend.
fn arguments<'q, DB>(args: &[Arg<'q>]) -> Result<DB::Arguments<'q>, StoreError>
where
    DB: Database,
    Id: Encode<'q, DB> + Type<DB>,
    Time: Encode<'q, DB> + Type<DB>,
    Option<Id>: Encode<'q, DB> + Type<DB>,
    Option<Time>: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    i32: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
    Option<f64>: Encode<'q, DB> + Type<DB>,
{
    let mut arguments = DB::Arguments::default();
    for arg in args {
        let added = match *arg {
            Arg::Id(id) => arguments.add(Id(id)),
            Arg::OptId(id) => arguments.add(id.map(Id)),
            Arg::Time(time) => arguments.add(Time(time)),
            Arg::OptTime(time) => arguments.add(time.map(Time)),
            Arg::Text(text) => arguments.add(text),
            Arg::OptText(text) => arguments.add(text),
            Arg::Int(int) => arguments.add(int),
            Arg::BigInt(int) => arguments.add(int),
            Arg::OptBigInt(int) => arguments.add(int),
            Arg::Float(float) => arguments.add(float),
            Arg::OptFloat(float) => arguments.add(float),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

/// A row struct that reads on both backends (derive `sqlx::FromRow` over columns of
/// [`Id`], [`Time`], text and numbers).
pub(crate) trait Record:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

impl<T> Record for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// Which SQL dialect a [`Db`] speaks, for the few statements whose text differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// Returns the statement of this dialect.
    pub(crate) fn pick<'a>(self, postgres: &'a str, sqlite: &'a str) -> &'a str {
        match self {
            Dialect::Postgres => postgres,
            Dialect::Sqlite => sqlite,
        }
    }
}

/// Where a statement runs: a pool (each statement on any connection) or the connection of
/// an open transaction.
#[derive(Debug)]
pub(crate) enum Db<'a> {
    PgPool(&'a PgPool),
    PgConn(&'a mut PgConnection),
    SqlitePool(&'a SqlitePool),
    SqliteConn(&'a mut SqliteConnection),
}

impl Db<'_> {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Db::PgPool(_) | Db::PgConn(_) => Dialect::Postgres,
            Db::SqlitePool(_) | Db::SqliteConn(_) => Dialect::Sqlite,
        }
    }

    /// Runs a statement and returns its rows.
    pub(crate) async fn fetch_all<R: Record>(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<R>, StoreError> {
        Ok(match self {
            Db::PgPool(pool) => pg_query(sql, args)?.fetch_all(*pool).await?,
            Db::PgConn(conn) => pg_query(sql, args)?.fetch_all(&mut **conn).await?,
            Db::SqlitePool(pool) => sqlite_query(sql, args)?.fetch_all(*pool).await?,
            Db::SqliteConn(conn) => sqlite_query(sql, args)?.fetch_all(&mut **conn).await?,
        })
    }

    /// Runs a statement and returns its first row, if any.
    pub(crate) async fn fetch_optional<R: Record>(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<R>, StoreError> {
        Ok(match self {
            Db::PgPool(pool) => pg_query(sql, args)?.fetch_optional(*pool).await?,
            Db::PgConn(conn) => pg_query(sql, args)?.fetch_optional(&mut **conn).await?,
            Db::SqlitePool(pool) => sqlite_query(sql, args)?.fetch_optional(*pool).await?,
            Db::SqliteConn(conn) => sqlite_query(sql, args)?.fetch_optional(&mut **conn).await?,
        })
    }

    /// Runs a statement that returns a row; no row is an error (as sqlx's `fetch_one`).
    pub(crate) async fn fetch_one<R: Record>(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<R, StoreError> {
        let row = self.fetch_optional(sql, args).await?;
        Ok(row.ok_or(sqlx::Error::RowNotFound)?)
    }

    /// Runs a statement and returns how many rows it changed.
    pub(crate) async fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let done = match self {
            Db::PgPool(pool) => pg_statement(sql, args)?
                .execute(*pool)
                .await?
                .rows_affected(),
            Db::PgConn(conn) => pg_statement(sql, args)?
                .execute(&mut **conn)
                .await?
                .rows_affected(),
            Db::SqlitePool(pool) => sqlite_statement(sql, args)?
                .execute(*pool)
                .await?
                .rows_affected(),
            Db::SqliteConn(conn) => sqlite_statement(sql, args)?
                .execute(&mut **conn)
                .await?
                .rows_affected(),
        };
        Ok(done)
    }
}

type PgQueryAs<'q, R> = sqlx::query::QueryAs<'q, Postgres, R, sqlx::postgres::PgArguments>;
type SqliteQueryAs<'q, R> = sqlx::query::QueryAs<'q, Sqlite, R, sqlx::sqlite::SqliteArguments<'q>>;

fn pg_query<'q, R: Record>(sql: &'q str, args: &[Arg<'q>]) -> Result<PgQueryAs<'q, R>, StoreError> {
    Ok(sqlx::query_as_with(sql, arguments::<Postgres>(args)?))
}

fn sqlite_query<'q, R: Record>(
    sql: &'q str,
    args: &[Arg<'q>],
) -> Result<SqliteQueryAs<'q, R>, StoreError> {
    Ok(sqlx::query_as_with(sql, arguments::<Sqlite>(args)?))
}

fn pg_statement<'q>(
    sql: &'q str,
    args: &[Arg<'q>],
) -> Result<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>, StoreError> {
    Ok(sqlx::query_with(sql, arguments::<Postgres>(args)?))
}

fn sqlite_statement<'q>(
    sql: &'q str,
    args: &[Arg<'q>],
) -> Result<sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>, StoreError> {
    Ok(sqlx::query_with(sql, arguments::<Sqlite>(args)?))
}

/// A write transaction on either backend. Dropping it rolls it back.
#[derive(Debug)]
pub(crate) enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    /// The transaction's connection, to run statements on.
    pub(crate) fn db(&mut self) -> Db<'_> {
        match self {
            Tx::Postgres(tx) => Db::PgConn(tx),
            Tx::Sqlite(tx) => Db::SqliteConn(tx),
        }
    }

    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Postgres(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls back now: a dropped transaction is rolled back, and on PostgreSQL its row locks
    /// released, only lazily.
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        match self {
            Tx::Postgres(tx) => tx.rollback().await?,
            Tx::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    #[test]
    fn time_text_has_fixed_width_and_round_trips() {
        let whole = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
        let later = whole + Duration::microseconds(1);
        assert_eq!(time_text(whole), "2024-05-01T12:00:00.000000Z");
        assert_eq!(time_text(later), "2024-05-01T12:00:00.000001Z");
        assert!(time_text(whole) < time_text(later));
        assert_eq!(parse_time(&time_text(later)).unwrap(), later);
    }
}
