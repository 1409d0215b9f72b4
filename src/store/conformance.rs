//! The backend promises, written once and run against every backend
//! (SQLite in a temporary directory, PostgreSQL in a schema of its own on the
//! test cluster of `testpg`). Where the databases differ the fixture says so
//! and the test checks each one's documented behaviour (docs/STORAGE.md).

use std::sync::Arc;

use super::{
    Backend, InboxMsg, InboxQuota, NewEpoch, Op, Outcome, PostgresBackend, Record, Refusal,
    Revocation, RevocationKind, SqliteBackend, StoreError,
};
use crate::clock::now_ms;
use crate::config::{PostgresConfig, StorageConfig, SyncMode};

const TABLE: &str = "sensors_data";
const FAR: i64 = i64::MAX;

type OpResult = Result<Outcome, Arc<StoreError>>;

/// One backend under test, and a second door into its database.
pub trait Fixture {
    fn open(&self) -> Box<dyn Backend>;
    /// Rows of `table`.
    fn count(&self, table: &str) -> i64;
    /// Bytes of publication text in `history`, counted by the database.
    fn stored_bytes(&self) -> u64;
    /// Tables called `name` (0 or 1).
    fn tables_named(&self, name: &str) -> i64;
    /// Make every insert into `inbox` for `user` fail with `message`.
    fn refuse_inbox_user(&self, user: &str, message: &str);
    /// Make every insert into the ingest table for `user` fail with `message`.
    fn refuse_records_of(&self, user: &str, message: &str);
    fn drop_table(&self, table: &str);
    /// Whether text columns take NUL (SQLite yes, PostgreSQL no).
    fn text_holds_nul(&self) -> bool;
    /// Whether ids come without gaps (SQLite yes; PostgreSQL's sequences
    /// skip numbers used by rolled-back or conflicting inserts).
    fn dense_ids(&self) -> bool;
    /// Whether `e` is a failed statement (not a refusal before one ran).
    fn is_statement_error(&self, e: &StoreError) -> bool;
    /// The senders of `user`'s inbox messages, oldest first (`None`: the backend).
    fn inbox_senders(&self, user: &str) -> Vec<Option<String>>;
}

pub struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    pub fn new() -> Sqlite {
        Sqlite {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn conn(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.path().join(super::sqlite::DB_FILE)).unwrap()
    }
}

impl Fixture for Sqlite {
    fn open(&self) -> Box<dyn Backend> {
        let cfg = StorageConfig {
            data_dir: self.dir.path().to_owned(),
            ..StorageConfig::default()
        };
        Box::new(SqliteBackend::open(&cfg, TABLE).unwrap())
    }
    fn count(&self, table: &str) -> i64 {
        self.conn()
            .query_row(&format!("SELECT count(*) FROM \"{table}\""), [], |r| {
                r.get(0)
            })
            .unwrap()
    }
    fn stored_bytes(&self) -> u64 {
        self.conn()
            .query_row(
                "SELECT COALESCE(SUM(length(CAST(payload AS BLOB))), 0) FROM history",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .unwrap()
    }
    fn tables_named(&self, name: &str) -> i64 {
        self.conn()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [name],
                |r| r.get(0),
            )
            .unwrap()
    }
    fn refuse_inbox_user(&self, user: &str, message: &str) {
        self.conn()
            .execute_batch(&format!(
                "CREATE TRIGGER refuse BEFORE INSERT ON inbox WHEN NEW.user_id = '{user}' \
                 BEGIN SELECT RAISE(ABORT, '{message}'); END;"
            ))
            .unwrap();
    }
    fn refuse_records_of(&self, user: &str, message: &str) {
        self.conn()
            .execute_batch(&format!(
                "CREATE TRIGGER refuse_records BEFORE INSERT ON {TABLE} \
                 WHEN NEW.user_id = '{user}' BEGIN SELECT RAISE(ABORT, '{message}'); END;"
            ))
            .unwrap();
    }
    fn drop_table(&self, table: &str) {
        self.conn()
            .execute_batch(&format!("DROP TABLE \"{table}\""))
            .unwrap();
    }
    fn text_holds_nul(&self) -> bool {
        true
    }
    fn dense_ids(&self) -> bool {
        true
    }
    fn is_statement_error(&self, e: &StoreError) -> bool {
        matches!(e, StoreError::Sql(_))
    }
    fn inbox_senders(&self, user: &str) -> Vec<Option<String>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT sender FROM inbox WHERE user_id = ?1 ORDER BY id")
            .unwrap();
        st.query_map([user], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

pub struct Postgres {
    schema: String,
}

impl Postgres {
    pub fn new() -> Postgres {
        Postgres {
            schema: super::testpg::Cluster::shared().fresh_schema(),
        }
    }
    pub fn config(&self) -> PostgresConfig {
        PostgresConfig {
            url: super::testpg::Cluster::shared().url(),
            schema: self.schema.clone(),
            ..PostgresConfig::default()
        }
    }
    fn client(&self) -> postgres::Client {
        super::testpg::Cluster::shared()
            .client(&self.schema)
            .unwrap()
    }
    fn scalar(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }
}

impl Fixture for Postgres {
    fn open(&self) -> Box<dyn Backend> {
        Box::new(PostgresBackend::open(&self.config(), SyncMode::Full, TABLE).unwrap())
    }
    fn count(&self, table: &str) -> i64 {
        self.scalar(&format!("SELECT count(*) FROM \"{table}\""))
    }
    fn stored_bytes(&self) -> u64 {
        self.scalar("SELECT COALESCE(SUM(octet_length(payload)), 0)::BIGINT FROM history") as u64
    }
    fn tables_named(&self, name: &str) -> i64 {
        self.client()
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
                &[&self.schema, &name],
            )
            .unwrap()
            .get(0)
    }
    fn refuse_inbox_user(&self, user: &str, message: &str) {
        self.client()
            .batch_execute(&format!(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.user_id = '{user}' THEN RAISE EXCEPTION '{message}'; END IF; \
                 RETURN NEW; END $$; \
                 CREATE TRIGGER refuse BEFORE INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION refuse();"
            ))
            .unwrap();
    }
    fn refuse_records_of(&self, user: &str, message: &str) {
        self.client()
            .batch_execute(&format!(
                "CREATE FUNCTION refuse_records() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF NEW.user_id = '{user}' THEN RAISE EXCEPTION '{message}'; END IF; \
                 RETURN NEW; END $$; \
                 CREATE TRIGGER refuse_records BEFORE INSERT ON {TABLE} FOR EACH ROW \
                 EXECUTE FUNCTION refuse_records();"
            ))
            .unwrap();
    }
    fn drop_table(&self, table: &str) {
        self.client()
            .batch_execute(&format!("DROP TABLE \"{table}\""))
            .unwrap();
    }
    fn text_holds_nul(&self) -> bool {
        false
    }
    fn dense_ids(&self) -> bool {
        false
    }
    fn is_statement_error(&self, e: &StoreError) -> bool {
        matches!(e, StoreError::Pg(_))
    }
    fn inbox_senders(&self, user: &str) -> Vec<Option<String>> {
        self.client()
            .query(
                "SELECT sender FROM inbox WHERE user_id = $1 ORDER BY id",
                &[&user],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Ok(mut c) = super::testpg::Cluster::shared().client(&self.schema) {
            let _ = c.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema));
        }
    }
}

fn ingest(user: &str, client_id: Option<&str>, data: &str) -> Op {
    Op::Ingest {
        table: TABLE.into(),
        kind: "sensor_data".into(),
        user: user.into(),
        connection: "0.1".into(),
        client_id: client_id.map(Into::into),
        received_at_ms: 1_000,
        data: data.as_bytes().to_vec(),
    }
}

fn put(user: &str, text: &str, expires_at_ms: i64, max_per_user: usize) -> Op {
    Op::InboxPut {
        user: user.into(),
        sender: None,
        payload: format!(r#"{{"text":"{text}"}}"#).into_bytes(),
        created_at_ms: now_ms(),
        expires_at_ms,
        quota: InboxQuota {
            max_per_user,
            max_bytes_per_user: 1 << 20,
            max_bytes_per_sender: 1 << 20,
        },
    }
}

fn put_from(user: &str, sender: Option<&str>, bytes: usize, quota: InboxQuota) -> Op {
    Op::InboxPut {
        user: user.into(),
        sender: sender.map(Into::into),
        payload: format!(r#"{{"t":"{}"}}"#, "x".repeat(bytes.saturating_sub(8))).into_bytes(),
        created_at_ms: now_ms(),
        expires_at_ms: FAR,
        quota,
    }
}

fn publication(channel: &str, epoch: &str, offset: u64, expires_at_ms: i64, keep: usize) -> Op {
    Op::Publication {
        channel: channel.into(),
        epoch: epoch.into(),
        offset,
        payload: Arc::from(format!(r#"{{"n":{offset}}}"#).as_bytes()),
        at_ms: 5,
        expires_at_ms,
        keep,
    }
}

fn revoke(kind: RevocationKind, value: &str, at: i64, exp: i64, reason: &str) -> Op {
    Op::Revoke(Revocation {
        kind,
        value: value.into(),
        revoked_at_ms: at,
        expires_at_ms: exp,
        reason: reason.into(),
    })
}

fn one(b: &mut Box<dyn Backend>, op: Op) -> Outcome {
    b.apply(vec![op]).pop().unwrap().unwrap()
}

fn inbox(b: &mut Box<dyn Backend>, user: &str) -> Vec<InboxMsg> {
    match one(
        b,
        Op::Inbox {
            user: user.into(),
            limit: 100,
        },
    ) {
        Outcome::Inbox(v) => v,
        o => panic!("{o:?}"),
    }
}

fn records(b: &mut Box<dyn Backend>, table: &str, after_id: i64, limit: usize) -> Vec<Record> {
    match one(
        b,
        Op::Records {
            table: table.into(),
            after_id,
            limit,
        },
    ) {
        Outcome::Records(v) => v,
        o => panic!("{o:?}"),
    }
}

pub fn ingest_inserts_and_deduplicates_by_user_and_client_id(f: &dyn Fixture) {
    let mut b = f.open();
    let r = b.apply(vec![
        ingest("u1", Some("c1"), r#"{"t":1}"#),
        ingest("u1", Some("c1"), r#"{"t":2}"#), // same batch
        ingest("u2", Some("c1"), r#"{"t":3}"#), // another user
        ingest("u1", None, r#"{"t":4}"#),
        ingest("u1", None, r#"{"t":4}"#), // no client id: never a duplicate
    ]);
    let r: Vec<(i64, bool)> = r
        .into_iter()
        .map(|r| match r.unwrap() {
            Outcome::Ingested { id, duplicate } => (id, duplicate),
            o => panic!("{o:?}"),
        })
        .collect();
    // Ids ascend and are never reused; SQLite's are dense, PostgreSQL's may
    // skip the number a duplicate's insert attempt used up.
    let first = r[0].0;
    assert_eq!(r[0], (first, false));
    assert_eq!(r[1], (first, true), "the same batch");
    assert!(!r[2].1 && !r[3].1 && !r[4].1, "{r:?}");
    assert!(
        first < r[2].0 && r[2].0 < r[3].0 && r[3].0 < r[4].0,
        "{r:?}"
    );
    if f.dense_ids() {
        assert_eq!([first, r[2].0, r[3].0, r[4].0], [1, 2, 3, 4]);
    }
    // A later batch too.
    assert_eq!(
        one(&mut b, ingest("u1", Some("c1"), "{}")),
        Outcome::Ingested {
            id: first,
            duplicate: true
        }
    );
    let all = records(&mut b, TABLE, 0, 100);
    assert_eq!(all.len(), 4);
    assert_eq!(
        all[0],
        Record {
            id: first,
            kind: "sensor_data".into(),
            user: "u1".into(),
            connection: "0.1".into(),
            client_id: Some("c1".into()),
            received_at_ms: 1_000,
            data: r#"{"t":1}"#.into(),
        }
    );
    assert_eq!(all[3].client_id, None);
    let page: Vec<i64> = records(&mut b, TABLE, first, 2)
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(page, vec![r[2].0, r[3].0]);
}

pub fn ingest_creates_another_table_on_first_use(f: &dyn Fixture) {
    let mut b = f.open();
    let op = Op::Ingest {
        table: "other_table".into(),
        kind: "k".into(),
        user: "u".into(),
        connection: "c".into(),
        client_id: Some("x".into()),
        received_at_ms: 7,
        data: b"[1]".to_vec(),
    };
    assert_eq!(
        one(&mut b, op),
        Outcome::Ingested {
            id: 1,
            duplicate: false
        }
    );
    assert_eq!(records(&mut b, "other_table", 0, 10)[0].data, "[1]");
    assert_eq!(f.count(TABLE), 0);
    // A table nobody wrote to cannot be read.
    let r = b.apply(vec![Op::Records {
        table: "nope".into(),
        after_id: 0,
        limit: 1,
    }]);
    assert!(f.is_statement_error(r[0].as_ref().unwrap_err()));
    assert_eq!(f.tables_named("nope"), 0, "reading does not create it");
}

pub fn history_is_trimmed_to_keep_and_loads_after_reopening(f: &dyn Fixture) {
    let mut b = f.open();
    let mut ops: Vec<Op> = (1..=10)
        .map(|o| publication("b:x", "e1", o, FAR, 3))
        .collect();
    ops.extend((1..=2).map(|o| publication("a", "e2", o, FAR, 5)));
    ops.push(publication("c", "e3", 4, 1, 5)); // expired
    assert!(
        b.apply(ops)
            .into_iter()
            .all(|r| r.unwrap() == Outcome::Done)
    );
    assert_eq!(f.count("history"), 3 + 2 + 1);
    drop(b);

    let mut b = f.open();
    let loaded = b.load(now_ms()).unwrap();
    let summary: Vec<(&str, &str, u64, Vec<u64>)> = loaded
        .channels
        .iter()
        .map(|c| {
            let offsets = c.publications.iter().map(|p| p.offset).collect();
            (c.channel.as_str(), c.epoch.as_str(), c.top_offset, offsets)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", "e2", 2, vec![1, 2]),
            ("b:x", "e1", 10, vec![8, 9, 10]),
            ("c", "e3", 4, vec![]),
        ]
    );
    let p = &loaded.channels[1].publications[0];
    assert_eq!(&*p.payload, br#"{"n":8}"#);
    assert_eq!((p.at_ms, p.expires_at_ms), (5, FAR));
    assert!(loaded.revocations.is_empty());
}

pub fn a_new_epoch_drops_the_old_history(f: &dyn Fixture) {
    let mut b = f.open();
    b.apply(
        (1..=5)
            .map(|o| publication("ch", "old", o, FAR, 10))
            .collect(),
    );
    one(&mut b, publication("ch", "new", 1, FAR, 10));
    // Same epoch, an older offset arriving late: the top stays.
    one(&mut b, publication("ch", "new", 3, FAR, 10));
    one(&mut b, publication("ch", "new", 2, FAR, 10));
    let loaded = b.load(now_ms()).unwrap();
    let ch = &loaded.channels[0];
    assert_eq!((ch.epoch.as_str(), ch.top_offset), ("new", 3));
    let offsets: Vec<u64> = ch.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, vec![1, 2, 3]);
}

pub fn mark_renews_epochs_and_records_the_clean_token(f: &dyn Fixture) {
    let mut b = f.open();
    b.apply(
        (1..=3)
            .flat_map(|o| {
                [
                    publication("a", "e1", o, FAR, 10),
                    publication("b", "e1", o, FAR, 10),
                ]
            })
            .collect(),
    );
    assert_eq!(b.load(now_ms()).unwrap().clean_token, None);
    let renew = [NewEpoch {
        channel: "a".into(),
        epoch: "e2".into(),
    }];
    b.mark(&renew, Some("tok")).unwrap();
    assert_eq!(b.history_bytes(), f.stored_bytes());
    drop(b);
    let mut b = f.open();
    let loaded = b.load(now_ms()).unwrap();
    assert_eq!(loaded.clean_token.as_deref(), Some("tok"));
    let a = &loaded.channels[0];
    assert_eq!((a.epoch.as_str(), a.top_offset), ("e2", 3), "top kept");
    assert!(a.publications.is_empty(), "the old epoch's rows are gone");
    let bch = &loaded.channels[1];
    assert_eq!((bch.epoch.as_str(), bch.publications.len()), ("e1", 3));
    // A new publication in the new epoch continues after the kept top.
    one(&mut b, publication("a", "e2", 4, FAR, 10));
    b.mark(&[], None).unwrap();
    let loaded = b.load(now_ms()).unwrap();
    assert_eq!(loaded.clean_token, None);
    assert_eq!(loaded.channels[0].publications.len(), 1);
}

pub fn the_history_byte_budget_evicts_the_oldest_rows_of_any_channel(f: &dyn Fixture) {
    let mut b = f.open();
    // Payloads `{"n":N}`: 7 bytes for N < 10.
    b.set_history_budget(70);
    for o in 1..=5 {
        one(&mut b, publication("a", "e", o, FAR, 100));
    }
    for o in 1..=5 {
        one(&mut b, publication("b", "e", o, FAR, 100));
    }
    assert_eq!((b.history_bytes(), f.stored_bytes()), (70, 70));
    // One more, in a batch with another: the two oldest rows (of `a`) go.
    b.apply(vec![
        publication("b", "e", 6, FAR, 100),
        publication("c", "e", 1, FAR, 100),
    ]);
    assert_eq!((b.history_bytes(), f.stored_bytes()), (70, 70));
    let loaded = b.load(now_ms()).unwrap();
    let offsets = |i: usize| -> Vec<u64> {
        loaded.channels[i]
            .publications
            .iter()
            .map(|p| p.offset)
            .collect()
    };
    assert_eq!(offsets(0), vec![3, 4, 5]);
    assert_eq!(loaded.channels[0].top_offset, 5, "the top stays");
    assert_eq!(offsets(1), (1..=6).collect::<Vec<_>>());
    assert_eq!(offsets(2), vec![1]);
    // Trims, a new epoch and pruning keep the count exact.
    one(&mut b, publication("b", "e", 7, FAR, 2));
    one(&mut b, publication("a", "e2", 1, FAR, 100));
    one(&mut b, publication("c", "e", 2, 0, 100));
    assert_eq!(b.history_bytes(), f.stored_bytes());
    b.prune(now_ms()).unwrap();
    assert_eq!(b.history_bytes(), f.stored_bytes());
    let before = b.history_bytes();
    drop(b);
    assert_eq!(f.open().history_bytes(), before, "counted at open");
}

pub fn inbox_keeps_order_acks_only_for_the_owner_trims_and_expires(f: &dyn Fixture) {
    let mut b = f.open();
    let ids: Vec<i64> = b
        .apply(
            (0..5)
                .map(|i| put("alice", &format!("m{i}"), FAR, 3))
                .collect(),
        )
        .into_iter()
        .map(|r| match r.unwrap() {
            Outcome::Stored { id } => id,
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    one(&mut b, put("bob", "for bob", FAR, 3));
    one(&mut b, put("alice", "expired", now_ms() - 1, 3)); // id 7, trims m2
    let got = inbox(&mut b, "alice");
    let texts: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
    assert_eq!(texts, vec![&br#"{"text":"m3"}"#[..], br#"{"text":"m4"}"#]);
    assert_eq!(got[0].id, 4);
    assert_eq!(got[0].user, "alice");
    assert_eq!(got[0].expires_at_ms, FAR);

    let ack = |user: &str, id| Op::InboxAck {
        user: user.into(),
        id,
    };
    assert_eq!(one(&mut b, ack("bob", 4)), Outcome::Acked { found: false });
    assert_eq!(one(&mut b, ack("alice", 4)), Outcome::Acked { found: true });
    assert_eq!(
        one(&mut b, ack("alice", 4)),
        Outcome::Acked { found: false }
    );
    assert_eq!(inbox(&mut b, "alice").len(), 1);
    assert_eq!(inbox(&mut b, "bob").len(), 1);

    // Ids are never reused, even after the newest is deleted.
    assert_eq!(one(&mut b, ack("alice", 7)), Outcome::Acked { found: true });
    assert_eq!(
        one(&mut b, put("alice", "later", FAR, 3)),
        Outcome::Stored { id: 8 }
    );
    let limited = match one(
        &mut b,
        Op::Inbox {
            user: "alice".into(),
            limit: 1,
        },
    ) {
        Outcome::Inbox(v) => v,
        o => panic!("{o:?}"),
    };
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].id, 5);
}

pub fn reads_in_a_batch_see_its_writes(f: &dyn Fixture) {
    let mut b = f.open();
    let r = b.apply(vec![
        Op::Inbox {
            user: "u".into(),
            limit: 10,
        },
        put("u", "x", FAR, 10),
    ]);
    match &r[0] {
        Ok(Outcome::Inbox(v)) => assert_eq!(v.len(), 1),
        o => panic!("{o:?}"),
    }
    assert_eq!(r[1].as_ref().unwrap(), &Outcome::Stored { id: 1 });
}

pub fn revocations_upsert_keep_the_later_times_and_expire(f: &dyn Fixture) {
    let mut b = f.open();
    let now = now_ms();
    let r = b.apply(vec![
        revoke(RevocationKind::User, "mallory", 100, now + 1_000, "first"),
        revoke(RevocationKind::User, "mallory", 50, now + 2_000, "older"),
        revoke(RevocationKind::Token, "jti-1", 10, now - 1, "expired"),
        revoke(
            RevocationKind::Token,
            "mallory",
            10,
            now + 5,
            "same value, other kind",
        ),
    ]);
    assert!(r.into_iter().all(|r| r.unwrap() == Outcome::Done));
    drop(b);
    let mut b = f.open();
    let loaded = b.load(now).unwrap();
    assert_eq!(
        loaded.revocations,
        vec![
            Revocation {
                kind: RevocationKind::Token,
                value: "mallory".into(),
                revoked_at_ms: 10,
                expires_at_ms: now + 5,
                reason: "same value, other kind".into(),
            },
            Revocation {
                kind: RevocationKind::User,
                value: "mallory".into(),
                revoked_at_ms: 100,
                expires_at_ms: now + 2_000,
                reason: "first".into(),
            },
        ]
    );
    one(
        &mut b,
        revoke(RevocationKind::User, "mallory", 200, 0, "again"),
    );
    let rev = b.load(now).unwrap().revocations.pop().unwrap();
    assert_eq!((rev.revoked_at_ms, rev.expires_at_ms), (200, now + 2_000));
    assert_eq!(rev.reason, "again");
}

pub fn prune_deletes_expired_rows_only(f: &dyn Fixture) {
    let mut b = f.open();
    b.apply(vec![
        publication("ch", "e", 1, 100, 10),
        publication("ch", "e", 2, FAR, 10),
        put("u", "old", 100, 10),
        put("u", "new", FAR, 10),
        revoke(RevocationKind::Token, "t", 1, 100, ""),
        revoke(RevocationKind::Token, "t2", 1, FAR, ""),
        ingest("u", None, "{}"),
    ]);
    assert_eq!(b.prune(100).unwrap(), 3);
    assert_eq!(b.prune(100).unwrap(), 0);
    for table in ["history", "inbox", "revocations", TABLE, "channels"] {
        assert_eq!(f.count(table), 1, "{table}");
    }
}

pub fn a_bad_op_fails_alone(f: &dyn Fixture) {
    let mut b = f.open();
    let r = b.apply(vec![
        put("u", "a", FAR, 10),
        // Not an ingest table: creating its dedup index fails.
        Op::Ingest {
            table: "history".into(),
            kind: "k".into(),
            user: "u".into(),
            connection: "c".into(),
            client_id: None,
            received_at_ms: 0,
            data: b"{}".to_vec(),
        },
        publication("ch", "e", u64::MAX, FAR, 1),
        ingest("u", None, "\u{0}ok"),
        Op::Ingest {
            table: TABLE.into(),
            kind: "k".into(),
            user: "u".into(),
            connection: "c".into(),
            client_id: None,
            received_at_ms: 0,
            data: vec![0xff, 0xfe],
        },
        put("u", "b", FAR, 10),
    ]);
    assert_eq!(r[0].as_ref().unwrap(), &Outcome::Stored { id: 1 });
    assert!(f.is_statement_error(r[1].as_ref().unwrap_err()));
    assert!(matches!(
        &**r[2].as_ref().unwrap_err(),
        StoreError::OutOfRange {
            value: u64::MAX,
            ..
        }
    ));
    if f.text_holds_nul() {
        assert!(r[3].is_ok());
    } else {
        assert!(matches!(
            &**r[3].as_ref().unwrap_err(),
            StoreError::Nul { .. }
        ));
    }
    assert!(matches!(
        &**r[4].as_ref().unwrap_err(),
        StoreError::NotUtf8 { .. }
    ));
    assert_eq!(r[5].as_ref().unwrap(), &Outcome::Stored { id: 2 });
    // Refused before any statement ran: the transaction went on without them.
    assert_eq!(inbox(&mut b, "u").len(), 2);
    let stored = if f.text_holds_nul() { 1 } else { 0 };
    assert_eq!(records(&mut b, TABLE, 0, 10).len(), stored);
}

pub fn a_failing_statement_is_isolated_and_the_rest_retried(f: &dyn Fixture) {
    let mut b = f.open();
    f.refuse_inbox_user("bad", "refused by test");
    let r = b.apply(vec![
        put("u", "a", FAR, 10),
        publication("ch", "e", 1, FAR, 10),
        put("bad", "x", FAR, 10),
        put("u", "b", FAR, 10),
    ]);
    // Ids ascend and are never reused; PostgreSQL's sequences may skip the
    // numbers a rolled-back attempt used (SQLite gives them out again).
    let id = |r: &OpResult| match r {
        Ok(Outcome::Stored { id }) => *id,
        o => panic!("{o:?}"),
    };
    let (a, bb) = (id(&r[0]), id(&r[3]));
    assert!(0 < a && a < bb, "{a} {bb}");
    assert_eq!(r[1].as_ref().unwrap(), &Outcome::Done);
    let e = r[2].as_ref().unwrap_err();
    assert!(e.to_string().contains("refused by test"), "{e}");
    // Applied once each: the first attempt was rolled back.
    assert_eq!(f.count("inbox"), 2);
    assert_eq!(f.count("history"), 1);
    // Alone in its batch, it fails alone.
    let r = b.apply(vec![put("bad", "y", FAR, 10)]);
    assert!(r[0].is_err());
    let c = id(&Ok(one(&mut b, put("u", "c", FAR, 10))));
    assert!(c > bb);
}

pub fn a_failed_transaction_fails_every_write_and_applies_nothing(f: &dyn Fixture) {
    let mut b = f.open();
    f.drop_table(TABLE);
    let r = b.apply(vec![
        put("u", "a", FAR, 10),
        ingest("u", None, "{}"),
        ingest("u", Some("c"), "{}"),
        revoke(RevocationKind::User, "u", 1, FAR, ""),
        Op::Inbox {
            user: "u".into(),
            limit: 10,
        },
    ]);
    for (i, r) in r[..4].iter().enumerate() {
        let e = r.as_ref().unwrap_err();
        assert!(e.to_string().contains(TABLE), "{i}: {e}");
    }
    assert_eq!(r[4].as_ref().unwrap(), &Outcome::Inbox(vec![]));
    assert_eq!(f.count("inbox"), 0);
    assert_eq!(f.count("revocations"), 0);
    // The backend is still usable (PostgreSQL's sequence keeps the ids
    // the rolled-back attempts used: they are not given out again).
    assert!(matches!(
        one(&mut b, put("u", "b", FAR, 10)),
        Outcome::Stored { id } if id >= 1
    ));
    assert_eq!(f.count("inbox"), 1);
}

pub fn a_failing_record_fails_alone_among_records(f: &dyn Fixture) {
    let mut b = f.open();
    f.refuse_records_of("bad", "refused by test");
    let r = b.apply(vec![
        ingest("u", Some("a"), "{}"),
        put("u", "m", FAR, 10),
        ingest("bad", Some("b"), "{}"),
        ingest("u", Some("c"), "{}"),
        ingest("u", Some("a"), "{}"), // a duplicate of the first, same batch
    ]);
    let id = |r: &OpResult| match r {
        Ok(Outcome::Ingested { id, duplicate }) => (*id, *duplicate),
        o => panic!("{o:?}"),
    };
    let (a, dup_a) = id(&r[0]);
    assert!(!dup_a);
    assert!(r[1].is_ok(), "{:?}", r[1]);
    let e = r[2].as_ref().unwrap_err();
    assert!(e.to_string().contains("refused by test"), "{e}");
    let (c, _) = id(&r[3]);
    assert!(c > a);
    assert_eq!(id(&r[4]), (a, true));
    assert_eq!(f.count(TABLE), 2);
    assert_eq!(f.count("inbox"), 1);
}

/// Issue 12.7: the eviction rule and the byte quotas. A client's message
/// pushes out only clients' messages (oldest first) and is refused when
/// the backend's fill the inbox; the backend's push out anything; bytes
/// per user and per sender are bounded; nothing changes on a refusal.
pub fn inbox_quotas_and_the_eviction_rule(f: &dyn Fixture) {
    let mut b = f.open();
    let q = InboxQuota {
        max_per_user: 3,
        max_bytes_per_user: 1000,
        max_bytes_per_sender: 500,
    };
    let stored = |o: Outcome| match o {
        Outcome::Stored { id } => id,
        o => panic!("not stored: {o:?}"),
    };
    stored(one(&mut b, put_from("u", Some("friend"), 100, q)));
    for _ in 0..2 {
        stored(one(&mut b, put_from("u", None, 100, q)));
    }
    // Full by count: the stranger may push out the friend's, not the backend's.
    let first = stored(one(&mut b, put_from("u", Some("stranger"), 100, q)));
    let second = stored(one(&mut b, put_from("u", Some("stranger"), 100, q)));
    assert!(second > first, "ids ascend");
    if f.dense_ids() {
        assert_eq!(second, 5);
    }
    // The stranger's own older message went.
    assert_eq!(
        f.inbox_senders("u"),
        vec![None, None, Some("stranger".into())]
    );
    // Backend messages (which push out anything, oldest first) fill it:
    // a client's is then refused, and nothing changes.
    for _ in 0..3 {
        stored(one(&mut b, put_from("u", None, 100, q)));
    }
    assert_eq!(f.inbox_senders("u"), vec![None, None, None]);
    let before = inbox(&mut b, "u");
    assert_eq!(
        one(&mut b, put_from("u", Some("stranger"), 100, q)),
        Outcome::Refused(Refusal::UserFull)
    );
    assert_eq!(inbox(&mut b, "u"), before, "a refusal changes nothing");
    // Bytes per user: a 600-byte backend message pushes out the first 600.
    stored(one(&mut b, put_from("v", None, 600, q)));
    stored(one(&mut b, put_from("v", None, 600, q)));
    assert_eq!(f.count("inbox"), 4, "the first 600 went");
    assert_eq!(
        one(&mut b, put_from("v", None, 1001, q)),
        Outcome::Refused(Refusal::TooLarge)
    );
    assert_eq!(f.count("inbox"), 4);
    // Bytes per sender across users: 500.
    stored(one(&mut b, put_from("w1", Some("s"), 200, q)));
    stored(one(&mut b, put_from("w2", Some("s"), 200, q)));
    assert_eq!(
        one(&mut b, put_from("w3", Some("s"), 200, q)),
        Outcome::Refused(Refusal::SenderFull)
    );
    assert_eq!(f.inbox_senders("w3"), Vec::<Option<String>>::new());
    // Acknowledged messages free the sender's quota.
    let id = inbox(&mut b, "w1")[0].id;
    assert_eq!(
        one(
            &mut b,
            Op::InboxAck {
                user: "w1".into(),
                id,
            },
        ),
        Outcome::Acked { found: true }
    );
    stored(one(&mut b, put_from("w3", Some("s"), 200, q)));
    // The sizes and senders survive reopening.
    drop(b);
    let mut b = f.open();
    assert_eq!(
        one(&mut b, put_from("w4", Some("s"), 200, q)),
        Outcome::Refused(Refusal::SenderFull)
    );
}

/// Every test above, once per backend.
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[test]
            fn $name() {
                super::$name(&super::Sqlite::new());
            })*
        }
        mod postgres_backend {
            $(#[test]
            fn $name() {
                super::$name(&super::Postgres::new());
            })*
        }
    };
}

for_each_backend!(
    ingest_inserts_and_deduplicates_by_user_and_client_id,
    ingest_creates_another_table_on_first_use,
    history_is_trimmed_to_keep_and_loads_after_reopening,
    a_new_epoch_drops_the_old_history,
    mark_renews_epochs_and_records_the_clean_token,
    the_history_byte_budget_evicts_the_oldest_rows_of_any_channel,
    inbox_keeps_order_acks_only_for_the_owner_trims_and_expires,
    reads_in_a_batch_see_its_writes,
    revocations_upsert_keep_the_later_times_and_expire,
    prune_deletes_expired_rows_only,
    a_bad_op_fails_alone,
    a_failing_statement_is_isolated_and_the_rest_retried,
    a_failed_transaction_fails_every_write_and_applies_nothing,
    a_failing_record_fails_alone_among_records,
    inbox_quotas_and_the_eviction_rule,
);

/// A PostgreSQL schema of version 1 gets the inbox's sender and size
/// columns, the sizes of the messages already there filled in (as SQLite's
/// `schema_1_inboxes_are_migrated`).
#[test]
fn postgres_schema_1_inboxes_are_migrated() {
    let f = Postgres::new();
    {
        let mut c = f.client();
        c.batch_execute(&format!("CREATE SCHEMA \"{}\"", f.schema))
            .unwrap();
        c.batch_execute(&format!("SET search_path TO \"{}\"", f.schema))
            .unwrap();
        c.batch_execute(super::postgres::MIGRATIONS[0]).unwrap();
        c.batch_execute(
            "CREATE TABLE switchboard_schema (version INTEGER PRIMARY KEY, \
             applied_at_ms BIGINT NOT NULL); \
             INSERT INTO switchboard_schema VALUES (1, 1); \
             INSERT INTO inbox (user_id, payload, created_at_ms, expires_at_ms) \
             VALUES ('old', '{\"a\":1}', 1, 9223372036854775807);",
        )
        .unwrap();
    }
    let mut b = PostgresBackend::open(&f.config(), SyncMode::Full, TABLE).unwrap();
    assert_eq!(b.version().unwrap(), super::postgres::schema_version());
    let r = f
        .client()
        .query_one("SELECT sender, bytes FROM inbox", &[])
        .unwrap();
    let (sender, bytes): (Option<String>, i64) = (r.get(0), r.get(1));
    assert_eq!((sender, bytes), (None, 7));
}
