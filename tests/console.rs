//! The web console at `/`: served by a real server, then driven in headless
//! Chromium by tests/browser/console.mjs (connect, subscribe, publish over the
//! HTTP API and the WebSocket, direct messages, the status panel).
//!
//! Needs Chromium (`$CHROMIUM` or /usr/bin/chromium), node, and
//! `npm ci --prefix tests/browser`; `SWITCHBOARD_SKIP_BROWSER=1` skips the
//! browser part (the page is still checked over HTTP).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, start, test_config};
use switchboard::config::AuthMode;

/// The whole browser run; each step inside has its own 10 s limit.
const BROWSER_DEADLINE: Duration = Duration::from_secs(180);

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// What the browser test needs, or why it cannot run.
fn browser_prerequisites(dir: &Path) -> Result<PathBuf, String> {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!(
            "Chromium is not at {} (install it: `apt-get install -y chromium`, or set CHROMIUM to its path)",
            chromium.display()
        ));
    }
    if !dir.join("node_modules/playwright-core").is_dir() {
        missing.push(format!(
            "{} has no node_modules (run `npm ci --prefix tests/browser`)",
            dir.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push(
            "node is not on PATH (install Node.js >= 20: `apt-get install -y nodejs npm`)".into(),
        );
    }
    if missing.is_empty() {
        Ok(chromium)
    } else {
        Err(missing.join("\n"))
    }
}

/// Run `cmd`, killing it after `deadline`; (success, stdout + stderr).
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut output = out_reader.join().unwrap();
    output.push_str(&err_reader.join().unwrap());
    match status {
        Some(status) => (status.success(), format!("{output}(exit: {status})")),
        None => (
            false,
            format!("{output}(killed after {} s)", deadline.as_secs()),
        ),
    }
}

#[test]
fn web_console_in_a_headless_browser() {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = test_config(2);
    cfg.auth.mode = AuthMode::None;
    cfg.api.allow_anonymous = true;
    cfg.storage.data_dir = data.path().to_path_buf();
    let server = start(cfg);
    let addr = server.local_addr();

    // The page itself, over plain HTTP/1.1.
    let page = http(
        addr,
        &format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    );
    assert!(page.starts_with("HTTP/1.1 200"), "GET /:\n{page}");
    let ctype = header(&page, "content-type").unwrap_or_default();
    assert!(ctype.starts_with("text/html"), "content type {ctype:?}");
    assert!(
        page.contains("<title>Switchboard console</title>"),
        "{page}"
    );
    assert!(page.contains(r#"src="console.js""#), "{page}");
    for (path, ctype) in [
        ("/console.js", "text/javascript"),
        ("/console.css", "text/css"),
    ] {
        let r = http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "GET {path}:\n{r}");
        let got = header(&r, "content-type").unwrap_or_default();
        assert!(got.starts_with(ctype), "GET {path}: content type {got:?}");
    }

    // The browser part.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let skip = std::env::var("SWITCHBOARD_SKIP_BROWSER").is_ok_and(|v| v == "1");
    let chromium = match browser_prerequisites(&dir) {
        Ok(chromium) => chromium,
        Err(why) if skip => {
            eprintln!(
                "SWITCHBOARD_SKIP_BROWSER=1: skipped the browser test of the console:\n{why}"
            );
            server.shutdown();
            return;
        }
        Err(why) => panic!(
            "the browser test of the console cannot run:\n{why}\n\
             Install: `apt-get install -y chromium` and `npm ci --prefix tests/browser` \
             (bash .ci/run does both), or set SWITCHBOARD_SKIP_BROWSER=1 to skip it."
        ),
    };
    if skip {
        eprintln!("SWITCHBOARD_SKIP_BROWSER=1: skipped the browser test of the console");
        server.shutdown();
        return;
    }

    let mut node = Command::new("node");
    node.arg(dir.join("console.mjs"))
        .arg(format!("http://{addr}"))
        .env("CHROMIUM", &chromium)
        .current_dir(&dir);
    let (ok, output) = run_with_deadline(node, BROWSER_DEADLINE);
    println!("--- node tests/browser/console.mjs http://{addr}\n{output}");
    server.shutdown();
    assert!(ok, "the browser test of the console failed:\n{output}");
}
