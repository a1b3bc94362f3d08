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
     created_at, updated_at, expires_at, attempts, revision";

/// The columns a claim inserts: the key, the scope and the record.
const INSERT_COLUMNS: &str = "digest, tenant, principal, operation, \"key\", state, fingerprint, \
     token, lease_deadline, outcome, created_at, updated_at, expires_at, attempts, revision";

/// The placeholders of [`INSERT_COLUMNS`].
const INSERT_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15";

/// The record columns as typed NULLs (the branch of a `UNION` that has none).
const NULL_COLUMNS: &str = "NULL::text, NULL::bytea, NULL::bytea, NULL::bigint, NULL::bytea, \
     NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint";

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
];

/// Every statement of one store.
#[derive(Debug)]
pub(crate) struct Statements {
    /// Claim: `$1` digest, `$2..$5` tenant, principal, operation, key,
    /// `$6..$15` the record columns, `$16` now. Returns `(inserted, record columns)`.
    pub(crate) insert: Arc<str>,
    /// Claim after a read found nothing (`ClaimMode::ReadFirst`): the
    /// parameters of `insert`; a row if it inserted (or replaced an expired
    /// record), none if a live record is in place.
    pub(crate) insert_only: Arc<str>,
    /// `$1` digest, `$2` now.
    pub(crate) get: Arc<str>,
    /// `$1` digest, `$2` expected revision, `$3..$12` the record columns, `$13` now.
    /// One row affected if it swapped; when none, `get` tells why.
    pub(crate) cas: Arc<str>,
    /// `$1` digest, `$2` expected revision, `$3` now.
    pub(crate) delete: Arc<str>,
    /// `$1` now (below 2^63), `$2` limit.
    pub(crate) purge_low: Arc<str>,
    /// `$1` now (2^63 or more, i.e. negative as BIGINT), `$2` limit.
    pub(crate) purge_high: Arc<str>,
    /// `$1` digest, `$2` token, `$3..$12` the record columns, `$13` now.
    pub(crate) apply: Arc<str>,
}

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
                 attempts = EXCLUDED.attempts, revision = EXCLUDED.revision \
             WHERE NOT {live_cur} \
             RETURNING 1",
            live_cur = live("cur.expires_at", "$16"),
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
            live_e = live("expires_at", "$16"),
        );
        let insert_only = format!(
            "INSERT INTO {t} AS cur ({INSERT_COLUMNS}) VALUES ({INSERT_VALUES}) {on_conflict}"
        );
        let get = format!(
            "SELECT {RECORD_COLUMNS} FROM {t} WHERE digest = $1 AND {}",
            live("expires_at", "$2")
        );
        let set_record = "state = $3, fingerprint = $4, token = $5, lease_deadline = $6, \
             outcome = $7, created_at = $8, updated_at = $9, expires_at = $10, \
             attempts = $11, revision = $12";
        let live13 = live("expires_at", "$13");
        let cas = format!(
            "UPDATE {t} SET {set_record} \
             WHERE digest = $1 AND revision = $2 AND {live13}"
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
             WHERE digest = $1 AND state = 'in_flight' AND token = $2 AND {live13}"
        );
        Self {
            insert: insert.into(),
            insert_only: insert_only.into(),
            get: get.into(),
            cas: cas.into(),
            delete: delete.into(),
            purge_low: purge_low.into(),
            purge_high: purge_high.into(),
            apply: apply.into(),
        }
    }
}

/// The migration SQL for `table`: the template with the names substituted.
pub(crate) fn migration_sql(template: &str, table: &TableName) -> String {
    template
        .replace("{table}", &table.to_string())
        .replace("{index}", &table.quoted_index())
}
