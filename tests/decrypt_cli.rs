//! `switchboard decrypt`: records prepared by `ingest::prepare` under known
//! keys, stored in a table with the storage writer's schema, come back as
//! the original objects; wrong keys, a missing database or table give exit
//! code 2 and one clear line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use switchboard::config::IngestConfig;
use switchboard::ingest::{Sealer, prepare};

const SCHEMA: &str = "CREATE TABLE sensors_data (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    client_id TEXT,
    received_at INTEGER NOT NULL,
    data TEXT NOT NULL
)";

fn key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

fn ingest_cfg(key_byte: u8, kid: &str) -> IngestConfig {
    IngestConfig {
        key: Some(key(key_byte)),
        key_id: kid.into(),
        required_fields: vec!["timestamp".into(), "sensorId".into(), "value".into()],
        fields_to_encrypt: vec!["sensorId".into(), "value".into(), "location".into()],
        ..IngestConfig::default()
    }
}

/// (user, client id, received_at ms, data) of the stored records, in id order.
const RECORDS: &[(&str, Option<&str>, i64, &str)] = &[
    (
        "u1",
        Some("c-1"),
        1_712_000_000_123,
        r#"{"timestamp":1712000000000,"sensorId":"s-1","value":25.5,"humidity":60}"#,
    ),
    (
        "u2",
        None,
        1_712_000_001_000,
        r#"{"timestamp":1712000001000,"sensorId":"s-\"2\"","value":-3,"location":{"lat":52.52,"lon":13.405},"ok":true}"#,
    ),
    (
        "u1",
        Some("c-3"),
        1_712_000_002_999,
        r#"{"timestamp":1712000002000,"sensorId":"s-1","value":1e-7,"tags":["a","b"],"note":null}"#,
    ),
];

/// A database in `dir` with the records: the first sealed under the old
/// key k1, the others under the current key k2.
fn make_db(dir: &Path) {
    let db = rusqlite::Connection::open(dir.join("switchboard.db")).unwrap();
    db.execute_batch(SCHEMA).unwrap();
    let old = Sealer::from_config(&ingest_cfg(1, "k1")).unwrap().unwrap();
    let cur = Sealer::from_config(&ingest_cfg(2, "k2")).unwrap().unwrap();
    for (i, (user, client, at, data)) in RECORDS.iter().enumerate() {
        let sealer = if i == 0 { &old } else { &cur };
        let mut bytes = data.as_bytes().to_vec();
        let value = simd_json::to_borrowed_value(&mut bytes).unwrap();
        let stored = prepare(
            &ingest_cfg(2, "k2"),
            Some(sealer),
            &value,
            Some(data.as_bytes()),
        )
        .unwrap();
        let stored = String::from_utf8(stored).unwrap();
        assert!(!stored.contains("s-1"), "sensorId is sealed: {stored}");
        db.execute(
            "INSERT INTO sensors_data (type, user_id, connection_id, client_id, received_at, data) \
             VALUES ('sensor_data', ?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![user, format!("0.{i}"), client, at, stored],
        )
        .unwrap();
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A config file for `data_dir` with the current key and the old keys given.
fn write_config(dir: &Path, data_dir: &Path, current: u8, old: &[(&str, u8)]) -> PathBuf {
    let mut text = format!(
        "[storage]\ndata_dir = {}\n\n[ingest]\nkey = {}\nkey_id = \"k2\"\n\
         fields_to_encrypt = [\"sensorId\", \"value\", \"location\"]\n\
         required_fields = [\"timestamp\", \"sensorId\", \"value\"]\n",
        toml_str(&data_dir.display().to_string()),
        toml_str(&key(current)),
    );
    if !old.is_empty() {
        text.push_str("\n[ingest.old_keys]\n");
        for (kid, k) in old {
            text.push_str(&format!("{kid} = {}\n", toml_str(&key(*k))));
        }
    }
    let path = dir.join(format!("config-{current}-{}.toml", old.len()));
    std::fs::write(&path, text).unwrap();
    path
}

fn run(config: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .env_clear()
        .arg("decrypt")
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap()
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Exit code 2 and one line on stderr containing every part of `expect`.
fn assert_fails(out: &Output, expect: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("switchboard: "), "{err}");
    for e in expect {
        assert!(err.contains(e), "{e:?} not in: {err}");
    }
}

#[test]
fn decrypt_prints_the_original_records() {
    let tmp = tempfile::tempdir().unwrap();
    make_db(tmp.path());
    let config = write_config(tmp.path(), tmp.path(), 2, &[("k1", 1)]);
    let out = run(&config, &[]);
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let got = lines(&out);
    assert_eq!(got.len(), RECORDS.len());
    for (i, (line, (user, client, _, data))) in got.iter().zip(RECORDS).enumerate() {
        assert_eq!(line["id"], i as i64 + 1);
        assert_eq!(line["type"], "sensor_data");
        assert_eq!(line["userId"], *user);
        assert_eq!(line["connectionId"], format!("0.{i}"));
        assert_eq!(line["clientId"], serde_json::json!(client));
        let original: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(line["data"], original, "record {}", i + 1);
        // Byte for byte: member order and number spelling kept.
        assert!(text.contains(&format!("\"data\":{data}}}")), "{text}");
    }
    assert_eq!(got[0]["receivedAt"], "2024-04-01T19:33:20.123Z");
    assert_eq!(got[2]["receivedAt"], "2024-04-01T19:33:22.999Z");
    assert_eq!(got[0]["data"]["value"].as_f64(), Some(25.5));
}

#[test]
fn decrypt_filters_and_pages() {
    let tmp = tempfile::tempdir().unwrap();
    make_db(tmp.path());
    let config = write_config(tmp.path(), tmp.path(), 2, &[("k1", 1)]);
    let ids = |extra: &[&str]| -> Vec<i64> {
        lines(&run(&config, extra))
            .iter()
            .map(|l| l["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids(&["--user", "u1"]), [1, 3]);
    assert_eq!(ids(&["--user", "nobody"]), Vec::<i64>::new());
    assert_eq!(ids(&["--after-id", "1", "--limit", "1"]), [2]);
    assert_eq!(ids(&["--after-id", "1", "--user", "u1"]), [3]);
    assert_eq!(ids(&["--limit", "0"]), Vec::<i64>::new());
    assert_eq!(
        ids(&["--table", "sensors_data", "--after-id", "3"]),
        Vec::<i64>::new()
    );
}

#[test]
fn decrypt_refuses_wrong_keys_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    make_db(tmp.path());

    // The current key is wrong: record 2 (sealed under k2) fails; record 1 is printed first.
    let config = write_config(tmp.path(), tmp.path(), 9, &[("k1", 1)]);
    let out = run(&config, &[]);
    assert_fails(&out, &["record 2", "\"sensorId\"", "\"k2\"", "wrong key"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    // The old key is missing: record 1 names the unknown key id.
    let config = write_config(tmp.path(), tmp.path(), 2, &[]);
    assert_fails(
        &run(&config, &[]),
        &["record 1", "\"k1\"", "ingest.old_keys"],
    );

    // The old key is wrong.
    let config = write_config(tmp.path(), tmp.path(), 2, &[("k1", 7)]);
    assert_fails(&run(&config, &[]), &["record 1", "\"k1\"", "wrong key"]);
}

#[test]
fn decrypt_reports_missing_database_table_and_bad_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let config = write_config(tmp.path(), &empty, 2, &[]);
    assert_fails(&run(&config, &[]), &["no database at", "switchboard.db"]);
    assert!(!empty.join("switchboard.db").exists(), "nothing created");

    make_db(tmp.path());
    let config = write_config(tmp.path(), tmp.path(), 2, &[("k1", 1)]);
    assert_fails(
        &run(&config, &["--table", "other"]),
        &["no table \"other\""],
    );
    assert_fails(
        &run(&config, &["--table", "x; DROP TABLE sensors_data"]),
        &["SQL identifier"],
    );

    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[storage]\ndata_dir = {}\n[ingest]\nkey = \"c2hvcnQ=\"\n",
            toml_str(&tmp.path().display().to_string())
        ),
    )
    .unwrap();
    assert_fails(&run(&bad, &[]), &["ingest.key"]);
}

#[test]
fn decrypt_leaves_the_database_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    make_db(tmp.path());
    let db_path = tmp.path().join("switchboard.db");
    let before = std::fs::read(&db_path).unwrap();
    let config = write_config(tmp.path(), tmp.path(), 2, &[("k1", 1)]);
    assert_eq!(lines(&run(&config, &[])).len(), 3);
    assert_eq!(std::fs::read(&db_path).unwrap(), before);
}

#[test]
fn decrypt_reads_a_wal_database_beside_a_writer() {
    let tmp = tempfile::tempdir().unwrap();
    make_db(tmp.path());
    // As the storage writer keeps it: WAL mode, a connection open, and a
    // record committed to the WAL but not yet checkpointed.
    let writer = rusqlite::Connection::open(tmp.path().join("switchboard.db")).unwrap();
    writer.pragma_update(None, "journal_mode", "WAL").unwrap();
    writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    writer
        .execute(
            "INSERT INTO sensors_data (type, user_id, connection_id, client_id, received_at, data) \
             VALUES ('sensor_data', 'u3', '1.0', NULL, 0, '{\"plain\":1}')",
            [],
        )
        .unwrap();
    assert!(tmp.path().join("switchboard.db-wal").exists());
    let config = write_config(tmp.path(), tmp.path(), 2, &[("k1", 1)]);
    let got = lines(&run(&config, &["--user", "u3"]));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["data"], serde_json::json!({"plain": 1}));
    assert_eq!(got[0]["clientId"], serde_json::Value::Null);
    assert_eq!(got[0]["receivedAt"], "1970-01-01T00:00:00.000Z");
    drop(writer);
}
