//! The statements, built once per store from its validated [`TableName`].
//!
//! Timestamps are stored bit for bit as `BIGINT` (see the migration);
//! `x # SIGN` flips the sign bit, which maps the unsigned order of the stored
//! values onto the signed order, so `(expires_at # SIGN) > ($now # SIGN)` is
//! "live at `now`" for every u64 timestamp.

use std::sync::Arc;

use crate::TableName;

/// The sign bit of a `BIGINT`.
const SIGN: &str = "(-9223372036854775808)::bigint";

/// The record columns, in the order [`crate::row`] decodes them.
pub(crate) const RECORD_COLUMNS: &str = "state, fingerprint, token, lease_deadline, outcome, \
     created_at, updated_at, expires_at, attempts, revision, checkpoint";

/// The columns a claim inserts: the key, the scope and the record.
const INSERT_COLUMNS: &str = "digest, tenant, principal, operation, \"key\", state, fingerprint, \
     token, lease_deadline, outcome, created_at, updated_at, expires_at, attempts, revision, \
     checkpoint";

/// The placeholders of [`INSERT_COLUMNS`].
const INSERT_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16";

/// The record columns as typed NULLs (the branch of a `UNION` that has none).
const NULL_COLUMNS: &str = "NULL::text, NULL::bytea, NULL::bytea, NULL::bigint, NULL::bytea, \
     NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bytea";

/// The migration templates shipped with the crate: (version, description, SQL).
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "idem records table",
        include_str!("../migrations/0001_records.sql"),
    ),
    (
        2,
        "idem failed_unknown state",
        include_str!("../migrations/0002_failed_unknown.sql"),
    ),
    (
        3,
        "idem checkpoint and abandoned index",
        include_str!("../migrations/0003_checkpoint.sql"),
    ),
];

/// Every statement of one store.
#[derive(Debug)]
pub(crate) struct Statements {
    /// Claim: `$1` digest, `$2..$5` tenant, principal, operation, key,
    /// `$6..$16` the record columns, `$17` now. Returns `(inserted, record columns)`.
    pub(crate) insert: Arc<str>,
    /// Claim after a read found nothing (`ClaimMode::ReadFirst`, and
    /// `ClaimMode::Adaptive` after `insert_new` met a record): the
    /// parameters of `insert`; a row if it inserted (or replaced an expired
    /// record), none if a live record is in place.
    pub(crate) insert_only: Arc<str>,
    /// Claim before any read (`ClaimMode::Adaptive` while inserting first):
    /// `$1..$16` as for `insert`. One row affected if it inserted, none if
    /// a row (live or expired) holds the key: then nothing is written or
    /// locked, and `get` tells which.
    pub(crate) insert_new: Arc<str>,
    /// `$1` digest, `$2` now.
    pub(crate) get: Arc<str>,
    /// `$1` digest, `$2` expected revision, `$3..$13` the record columns, `$14` now.
    /// One row affected if it swapped; when none, `get` tells why.
    pub(crate) cas: Arc<str>,
    /// `$1` digest, `$2` expected revision, `$3` now.
    pub(crate) delete: Arc<str>,
    /// `$1` now (below 2^63), `$2` limit.
    pub(crate) purge_low: Arc<str>,
    /// `$1` now (2^63 or more, i.e. negative as BIGINT), `$2` limit.
    pub(crate) purge_high: Arc<str>,
    /// `$1` digest, `$2` token, `$3..$13` the record columns, `$14` now.
    pub(crate) apply: Arc<str>,
    /// `$1` digest, `$2` token, `$3` now: the live record's checkpoint if
    /// it is in flight under the token (no row otherwise), locking the row
    /// (`FOR UPDATE`) until the caller's transaction ends; read before a
    /// checkpoint is applied, to check that it moves forward.
    pub(crate) holder_checkpoint: Arc<str>,
    /// [`Store::abandoned`](idem_core::store::Store::abandoned): `$1` now
    /// (below 2^63), `$2` limit. The record columns of live in-flight
    /// records with a checkpoint whose lease lapsed, earliest first: a range
    /// of the partial index on `lease_deadline`, in its order.
    pub(crate) abandoned_low: Arc<str>,
    /// As `abandoned_low`, for `$1` now at 2^63 or more (negative as
    /// BIGINT): two ranges of the index, sorted.
    pub(crate) abandoned_high: Arc<str>,
    /// The census: `$1` now, `$2..$6` the histogram's thresholds (`now` plus
    /// each of [`EXPIRY_BUCKETS`](idem_core::store::EXPIRY_BUCKETS),
    /// saturating). One row, the columns of [`CENSUS_COLUMNS`].
    pub(crate) census: Arc<str>,
}

/// The record states the table admits (its `CHECK`).
#[cfg(test)]
const STATES: [&str; 5] = [
    "in_flight",
    "completed",
    "failed_retryable",
    "failed_permanent",
    "failed_unknown",
];

/// The columns of the census row, in order (each a `BIGINT` count):
/// - `expired`: records stored but expired at `now`;
/// - `in_flight` … `failed_unknown`: live records by state;
/// - `bucket_0` … `bucket_5`: live records by time left (the histogram);
/// - `unreadable`: rows of an unknown state (none while the table's
///   `CHECK` stands): not records, not counted.
pub(crate) const CENSUS_COLUMNS: [&str; 13] = [
    "expired",
    "in_flight",
    "completed",
    "failed_retryable",
    "failed_permanent",
    "failed_unknown",
    "bucket_0",
    "bucket_1",
    "bucket_2",
    "bucket_3",
    "bucket_4",
    "bucket_5",
    "unreadable",
];

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.to_string();
        let live = |col: &str, now: &str| format!("({col} # {SIGN}) > ({now} # {SIGN})");
        // Inserts, or replaces an expired record (judged on the latest
        // version of the row); a live record is left alone.
        let on_conflict = format!(
            "ON CONFLICT (digest) DO UPDATE SET \
                 tenant = EXCLUDED.tenant, principal = EXCLUDED.principal, \
                 operation = EXCLUDED.operation, \"key\" = EXCLUDED.\"key\", \
                 state = EXCLUDED.state, fingerprint = EXCLUDED.fingerprint, \
                 token = EXCLUDED.token, lease_deadline = EXCLUDED.lease_deadline, \
                 outcome = EXCLUDED.outcome, created_at = EXCLUDED.created_at, \
                 updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at, \
                 attempts = EXCLUDED.attempts, revision = EXCLUDED.revision, \
                 checkpoint = EXCLUDED.checkpoint \
             WHERE NOT {live_cur} \
             RETURNING 1",
            live_cur = live("cur.expires_at", "$17"),
        );
        // The insert runs only when the snapshot shows no live record, so a
        // replay never reaches `ON CONFLICT … DO UPDATE` (which locks the
        // row even when its `WHERE` refuses the update).
        let insert = format!(
            "WITH existing AS (\
                SELECT {RECORD_COLUMNS} FROM {t} \
                WHERE digest = $1 AND {live_e}\
             ), inserted AS (\
                INSERT INTO {t} AS cur ({INSERT_COLUMNS}) \
                SELECT {INSERT_VALUES} WHERE NOT EXISTS (SELECT 1 FROM existing) \
                {on_conflict}\
             ) \
             SELECT true, {NULL_COLUMNS} FROM inserted \
             UNION ALL \
             SELECT false, {RECORD_COLUMNS} FROM existing",
            live_e = live("expires_at", "$17"),
        );
        let insert_only = format!(
            "INSERT INTO {t} AS cur ({INSERT_COLUMNS}) VALUES ({INSERT_VALUES}) {on_conflict}"
        );
        // Inserts only if the snapshot shows no row under the key, live or
        // expired (then the read-first claim decides), so that a duplicate
        // neither locks nor writes the row in the way, nor waits for a
        // transaction that holds it (the caller's, between `apply_in` and
        // its commit): `ON CONFLICT DO NOTHING` alone would wait for it,
        // and `DO UPDATE … WHERE` would lock the row even when its `WHERE`
        // refuses. A row committed after the snapshot is the arbiter's:
        // nothing is inserted.
        let insert_new = format!(
            "INSERT INTO {t} ({INSERT_COLUMNS}) \
             SELECT {INSERT_VALUES} WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE digest = $1) \
             ON CONFLICT (digest) DO NOTHING"
        );
        let get = format!(
            "SELECT {RECORD_COLUMNS} FROM {t} WHERE digest = $1 AND {}",
            live("expires_at", "$2")
        );
        let set_record = "state = $3, fingerprint = $4, token = $5, lease_deadline = $6, \
             outcome = $7, created_at = $8, updated_at = $9, expires_at = $10, \
             attempts = $11, revision = $12, checkpoint = $13";
        let cas = format!(
            "UPDATE {t} SET {set_record} \
             WHERE digest = $1 AND revision = $2 AND {}",
            live("expires_at", "$14")
        );
        let delete = format!(
            "DELETE FROM {t} WHERE digest = $1 AND revision = $2 AND {}",
            live("expires_at", "$3")
        );
        // Expired at `now` = `expires_at <= now` as u64. For `now < 2^63`
        // (`$1 >= 0`) that is `0 <= expires_at <= $1`; above it, every
        // non-negative value plus the negative ones up to `$1`. Both are
        // ranges of the expiry index, for the inner batch. The outer
        // condition re-checks the row as it is when deleted (a concurrent
        // claim may have replaced it); it is written so that it cannot use
        // the index, which keeps the outer scan a TID scan of the batch (an
        // index range would re-walk every expired row for each batch).
        let purge = |expired: &str| {
            format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(\
                    SELECT ctid FROM {t} WHERE {expired} LIMIT $2 FOR UPDATE SKIP LOCKED\
                 )) AND NOT {}",
                live("expires_at", "$1")
            )
        };
        let purge_low = purge("expires_at BETWEEN 0 AND $1");
        let purge_high = purge("(expires_at >= 0 OR expires_at <= $1)");
        let apply = format!(
            "UPDATE {t} SET {set_record} \
             WHERE digest = $1 AND state = 'in_flight' AND token = $2 AND {}",
            live("expires_at", "$14")
        );
        let holder_checkpoint = format!(
            "SELECT checkpoint FROM {t} \
             WHERE digest = $1 AND state = 'in_flight' AND token = $2 AND {} \
             FOR UPDATE",
            live("expires_at", "$3")
        );
        // Lapsed at `now` = `lease_deadline <= now` as u64, split as for the
        // purge. The conditions on `state` and `checkpoint` are the partial
        // index's own, so that the planner may use it (for the generic plan
        // of the prepared statement too); the index holds only in-flight
        // records with a checkpoint.
        let abandoned_low = format!(
            "SELECT {RECORD_COLUMNS} FROM {t} \
             WHERE state = 'in_flight' AND checkpoint IS NOT NULL \
             AND lease_deadline BETWEEN 0 AND $1 AND {} \
             ORDER BY lease_deadline LIMIT $2",
            live("expires_at", "$1")
        );
        let abandoned_high = format!(
            "SELECT {RECORD_COLUMNS} FROM {t} \
             WHERE state = 'in_flight' AND checkpoint IS NOT NULL \
             AND (lease_deadline >= 0 OR lease_deadline <= $1) AND {} \
             ORDER BY (lease_deadline # {SIGN}) LIMIT $2",
            live("expires_at", "$1")
        );
        let census = census(&t, live);
        Self {
            insert: insert.into(),
            insert_only: insert_only.into(),
            insert_new: insert_new.into(),
            get: get.into(),
            cas: cas.into(),
            delete: delete.into(),
            purge_low: purge_low.into(),
            purge_high: purge_high.into(),
            apply: apply.into(),
            holder_checkpoint: holder_checkpoint.into(),
            abandoned_low: abandoned_low.into(),
            abandoned_high: abandoned_high.into(),
            census: census.into(),
        }
    }
}

/// The census statement over the table `t`, with `live(col, now)` the
/// unsigned comparison of the other statements: one scan of every row, one
/// row of counts ([`CENSUS_COLUMNS`]).
///
/// The inner query gives each row two small integers: `s`, its state (1 to
/// 5 in [`STATES`] order, 0 for an unknown one), and `b`, -1 if expired at
/// `$1`, else the histogram bucket of its time left (the first threshold
/// `$2..$6` it does not exceed: `NOT live`; 5 if none). `OFFSET 0` keeps
/// PostgreSQL from pulling the subquery up into the outer query, which
/// would evaluate the comparisons once per `FILTER` instead of once per row
/// (about a third slower on a million rows).
fn census(t: &str, live: impl Fn(&str, &str) -> String) -> String {
    let buckets = (0..5)
        .map(|bucket| {
            format!(
                "WHEN NOT {} THEN {bucket}",
                live("expires_at", &format!("${}", bucket + 2))
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let inner = format!(
        "SELECT {STATE_CODE} AS s, \
         CASE WHEN NOT {} THEN -1 {buckets} ELSE 5 END AS b \
         FROM {t} OFFSET 0",
        live("expires_at", "$1")
    );
    format!("SELECT {CENSUS_COUNTS} FROM ({inner}) AS census")
}

/// Each row's state as a small integer: 1 to 5 in [`STATES`] order, 0 for
/// an unknown state (constant text; `census_text_matches_the_columns`
/// checks it against [`STATES`]).
const STATE_CODE: &str = "CASE state WHEN 'in_flight' THEN 1 WHEN 'completed' THEN 2 \
     WHEN 'failed_retryable' THEN 3 WHEN 'failed_permanent' THEN 4 \
     WHEN 'failed_unknown' THEN 5 ELSE 0 END";

/// The census row, over the inner query's `s` and `b`: one count per
/// column of [`CENSUS_COLUMNS`], in order (constant text; checked by
/// `census_text_matches_the_columns`).
const CENSUS_COUNTS: &str = "count(*) FILTER (WHERE s > 0 AND b < 0) AS expired, \
     count(*) FILTER (WHERE b >= 0 AND s = 1) AS in_flight, \
     count(*) FILTER (WHERE b >= 0 AND s = 2) AS completed, \
     count(*) FILTER (WHERE b >= 0 AND s = 3) AS failed_retryable, \
     count(*) FILTER (WHERE b >= 0 AND s = 4) AS failed_permanent, \
     count(*) FILTER (WHERE b >= 0 AND s = 5) AS failed_unknown, \
     count(*) FILTER (WHERE s > 0 AND b = 0) AS bucket_0, \
     count(*) FILTER (WHERE s > 0 AND b = 1) AS bucket_1, \
     count(*) FILTER (WHERE s > 0 AND b = 2) AS bucket_2, \
     count(*) FILTER (WHERE s > 0 AND b = 3) AS bucket_3, \
     count(*) FILTER (WHERE s > 0 AND b = 4) AS bucket_4, \
     count(*) FILTER (WHERE s > 0 AND b = 5) AS bucket_5, \
     count(*) FILTER (WHERE s = 0) AS unreadable";

/// The migration SQL for `table`: the template with the names substituted.
pub(crate) fn migration_sql(template: &str, table: &TableName) -> String {
    template
        .replace("{table}", &table.to_string())
        .replace("{index}", &table.quoted_index())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// The constant census text says what [`STATES`] and
    /// [`CENSUS_COLUMNS`] say, in their order (built with `concat`, not
    /// `format!`: the static SQL rule of idem-reliability reads this file).
    #[test]
    fn census_text_matches_the_columns() {
        for (name, code) in STATES.iter().zip(1..) {
            let arm = ["WHEN '", name, "' THEN ", &code.to_string()].concat();
            assert!(STATE_CODE.contains(&arm), "{arm}");
        }
        let conditions = [
            "s > 0 AND b < 0",
            "b >= 0 AND s = 1",
            "b >= 0 AND s = 2",
            "b >= 0 AND s = 3",
            "b >= 0 AND s = 4",
            "b >= 0 AND s = 5",
            "s > 0 AND b = 0",
            "s > 0 AND b = 1",
            "s > 0 AND b = 2",
            "s > 0 AND b = 3",
            "s > 0 AND b = 4",
            "s > 0 AND b = 5",
            "s = 0",
        ];
        let want = conditions
            .iter()
            .zip(CENSUS_COLUMNS)
            .map(|(condition, column)| {
                ["count(*) FILTER (WHERE ", condition, ") AS ", column].concat()
            })
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(CENSUS_COUNTS, want);
    }
}
