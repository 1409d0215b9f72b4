//! Damaged or missing database files (issue 11, points 4 and 5): a file
//! truncated mid-page, a page overwritten, or emptied where a store existed
//! refuses the start with one clear error, before the server listens.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::json;
use switchboard::Server;
use switchboard::config::IntegrityCheck;
use switchboard::error::StartError;
use switchboard::store::StoreError;
use tungstenite::Message;

/// A store with records, history and a clean shutdown behind it.
fn filled_store(dir: &Path) {
    let server = start(stored_config(2, dir));
    let mut c = ws(server.local_addr(), "/ws?userId=filler");
    let _welcome = c.read().unwrap();
    // Enough records for more than a hundred pages, acknowledged one by one.
    let pad = "x".repeat(200);
    for i in 0..2000 {
        c.send(Message::text(
            json!({"type":"sensor_data","id":format!("r-{i}"),"data":{"i":i,"pad":pad}})
                .to_string(),
        ))
        .unwrap();
        loop {
            let m: serde_json::Value =
                serde_json::from_str(c.read().unwrap().to_text().unwrap()).unwrap();
            if m["type"] == "ack" {
                break;
            }
        }
    }
    drop(c);
    server.shutdown();
}

fn db_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("switchboard.db")).unwrap().len()
}

fn start_err(dir: &Path) -> StartError {
    match Server::start(stored_config(1, dir)) {
        Ok(_) => panic!("a damaged store must not start"),
        Err(e) => e,
    }
}

#[test]
fn a_truncated_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    filled_store(dir.path());
    let file = dir.path().join("switchboard.db");
    let whole = std::fs::read(&file).unwrap();
    let len = whole.len() as u64;
    assert!(len > 100 * 4096, "{len}");
    // Mid-page, in the middle and in the last page.
    for cut in [len / 2 + 1000, len - 3000] {
        std::fs::write(&file, &whole).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let e = start_err(dir.path());
        assert!(
            matches!(e, StartError::Storage(StoreError::Damaged { .. })),
            "cut at {cut}: {e}"
        );
        let text = e.to_string();
        assert!(text.contains("is damaged"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
    // Without the check (as before it existed) a file cut in its last page
    // opens as if nothing happened: the check is what catches it.
    std::fs::write(&file, &whole).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - 3000).unwrap();
    drop(f);
    let mut cfg = stored_config(1, dir.path());
    cfg.storage.integrity_check = IntegrityCheck::Off;
    Server::start(cfg).expect("unchecked").shutdown();
}

#[test]
fn an_overwritten_page_refuses_to_start_and_the_check_can_be_chosen() {
    let dir = tempfile::tempdir().unwrap();
    filled_store(dir.path());
    let pages = db_len(dir.path()) / 4096;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("switchboard.db"))
        .unwrap();
    f.seek(SeekFrom::Start((pages / 3) * 4096)).unwrap();
    f.write_all(&[0xa5; 4096]).unwrap();
    drop(f);
    for check in [IntegrityCheck::Quick, IntegrityCheck::Full] {
        let mut cfg = stored_config(1, dir.path());
        cfg.storage.integrity_check = check;
        let e = match Server::start(cfg) {
            Ok(_) => panic!("{check:?}: a damaged store must not start"),
            Err(e) => e,
        };
        assert!(
            matches!(e, StartError::Storage(StoreError::Damaged { .. })),
            "{check:?}: {e}"
        );
    }
    // The binary: one line on stderr, a failing exit code, nothing listened.
    let config = dir.path().join("switchboard.toml");
    std::fs::write(
        &config,
        format!(
            "port = 0\nlog_level = \"warn\"\n[storage]\ndata_dir = {:?}\n",
            dir.path()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("is damaged"), "{stderr}");
    assert!(lines[0].contains("quick_check"), "{stderr}");
    // Without the check (as before it existed) it starts as if nothing
    // happened: the check is what catches it.
    let mut cfg = stored_config(1, dir.path());
    cfg.storage.integrity_check = IntegrityCheck::Off;
    Server::start(cfg).expect("unchecked").shutdown();
}

#[test]
fn an_emptied_file_where_a_store_existed_refuses_and_a_new_empty_one_warns() {
    let dir = tempfile::tempdir().unwrap();
    filled_store(dir.path());
    assert!(dir.path().join("clean-shutdown").exists());
    std::fs::File::create(dir.path().join("switchboard.db")).unwrap();
    let e = start_err(dir.path());
    assert!(
        matches!(e, StartError::Storage(StoreError::Emptied { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("clean-shutdown is present"), "{e}");
    // Without a sign that a store was there, an empty file is a new store.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::File::create(fresh.path().join("switchboard.db")).unwrap();
    let server = start(stored_config(1, fresh.path()));
    server.shutdown();
}

#[test]
fn storage_is_opened_before_the_server_listens() {
    // The port is taken and the store cannot be opened: the store's error
    // comes first, so nothing listened on the way to failing.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let on_taken_port = |data: &Path| {
        let mut cfg = stored_config(1, data);
        cfg.channels.publish = switchboard::config::Rule::Any;
        cfg.channels.subscribe = switchboard::config::Rule::Any;
        cfg.host = "127.0.0.1".into();
        cfg.port = port;
        cfg
    };
    match Server::start(on_taken_port(&not_a_dir)) {
        Err(StartError::Storage(_)) => {}
        Err(e) => panic!("storage must be opened before binding: {e}"),
        Ok(_) => panic!("must not start"),
    }
    // With a good store the same start fails on the port (the port really
    // is taken), and leaves the store as trusted as it found it: the next
    // start keeps the channel's epoch.
    let data = dir.path().join("data");
    let mut cfg = on_taken_port(&data);
    cfg.port = 0;
    let server = start(cfg.clone());
    let mut c = ws(server.local_addr(), "/ws?userId=p");
    let _welcome = c.read().unwrap();
    c.send(Message::text(
        json!({"type":"publish","channel":"kept","data":1}).to_string(),
    ))
    .unwrap();
    let published: serde_json::Value = loop {
        let m: serde_json::Value =
            serde_json::from_str(c.read().unwrap().to_text().unwrap()).unwrap();
        if m["type"] == "published" {
            break m;
        }
    };
    drop(c);
    server.shutdown();
    match Server::start(on_taken_port(&data)) {
        Err(StartError::Bind { .. }) => {}
        Err(e) => panic!("expected the port to be refused: {e}"),
        Ok(_) => panic!("must not start"),
    }
    let server = start(cfg);
    let mut c = ws(server.local_addr(), "/ws?userId=p");
    let _welcome = c.read().unwrap();
    c.send(Message::text(
        json!({"type":"subscribe","channel":"kept",
            "since":{"offset":1,"epoch":published["epoch"]}})
        .to_string(),
    ))
    .unwrap();
    let s: serde_json::Value = serde_json::from_str(c.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["epoch"], published["epoch"]);
    server.shutdown();
}

/// Publish on `channel` and return (epoch, offset) from `published`.
fn publish(addr: std::net::SocketAddr, channel: &str, data: i64) -> (String, u64) {
    let mut c = ws(addr, "/ws?userId=p");
    let _welcome = c.read().unwrap();
    c.send(Message::text(
        json!({"type":"publish","channel":channel,"data":data}).to_string(),
    ))
    .unwrap();
    loop {
        let m: serde_json::Value =
            serde_json::from_str(c.read().unwrap().to_text().unwrap()).unwrap();
        if m["type"] == "published" {
            return (
                m["epoch"].as_str().unwrap().to_owned(),
                m["offset"].as_u64().unwrap(),
            );
        }
    }
}

#[test]
fn a_database_restored_from_a_backup_is_not_trusted_with_the_newer_marker() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = stored_config(1, dir.path());
    cfg.channels.publish = switchboard::config::Rule::Any;
    let db = dir.path().join("switchboard.db");
    let backup = dir.path().join("backup.db");
    // Run 1: offsets 1..3, then a backup of the cleanly closed file.
    let server = start(cfg.clone());
    for n in 1..=3 {
        publish(server.local_addr(), "kept", n);
    }
    server.shutdown();
    std::fs::copy(&db, &backup).unwrap();
    // Run 2: the same epoch goes on to 5 (clients see 4 and 5).
    let server = start(cfg.clone());
    let (epoch, offset) = publish(server.local_addr(), "kept", 4);
    assert_eq!(offset, 4, "a clean restart continues the epoch");
    publish(server.local_addr(), "kept", 5);
    server.shutdown();
    // The backup comes back under run 2's marker: its top offset (3) is
    // behind what clients saw, so its epoch must not go on.
    std::fs::copy(&backup, &db).unwrap();
    let server = start(cfg);
    let (after, offset) = publish(server.local_addr(), "kept", 6);
    assert_ne!(
        (after.as_str(), offset),
        (epoch.as_str(), 4),
        "offset 4 of that epoch was already given to another publication"
    );
    assert_ne!(after, epoch, "a restored database starts new epochs");
    server.shutdown();
}
