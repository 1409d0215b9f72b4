//! A throwaway PostgreSQL server for tests (unit, integration, benchmarks):
//! `initdb` into a temporary directory, `postgres` on a free loopback port,
//! stopped when the test process ends. Not used by the server itself.
//!
//! Why it looks like this:
//! - PostgreSQL refuses to run as root. As root, the cluster runs as the
//!   `postgres` user (Debian's package creates it) or else `nobody`, in a
//!   directory it owns, through util-linux's `setpriv` (the crate forbids
//!   unsafe code, so no `pre_exec` here).
//! - The server must not outlive the test process, whatever ends it (a
//!   panic, a kill). It is started from one long-lived thread with
//!   `setpriv --pdeathsig INT` (SIGINT is PostgreSQL's fast shutdown):
//!   Linux sends the signal when that thread, i.e. the process, goes away.
//! - It runs in its own process group, so [`Cluster::kill9`] can SIGKILL
//!   the postmaster and every backend at once: a crash of the database
//!   server, not of Switchboard.
//! - Binaries: `$SWITCHBOARD_PG_BIN`, else the newest
//!   `/usr/lib/postgresql/*/bin`, else `PATH`.

use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running test cluster.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    /// (uid, gid) the server runs as, when we are root.
    run_as: Option<(u32, u32)>,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
    /// More `-c name=value` settings for the server.
    settings: Vec<String>,
}

static SCHEMAS: AtomicU32 = AtomicU32::new(0);

type Spawn = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread that starts every server process (see the module docs).
fn spawner() -> &'static Mutex<mpsc::Sender<Spawn>> {
    static TX: OnceLock<Mutex<mpsc::Sender<Spawn>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Spawn>();
        let spawned = std::thread::Builder::new()
            .name("testpg-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static: this thread never ends
                // before the process does.
            });
        if let Err(e) = spawned {
            panic!("cannot start the test PostgreSQL spawner thread: {e}");
        }
        Mutex::new(tx)
    })
}

fn spawn(cmd: Command) -> io::Result<Child> {
    let (reply, rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| io::Error::other("spawner lock poisoned"))?
        .send((cmd, reply))
        .map_err(|_| io::Error::other("spawner thread gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("spawner thread gone"))?
}

impl Cluster {
    /// The cluster shared by every test of this process (started on first use).
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| match Cluster::start() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start a test PostgreSQL server ({e}); install Debian's `postgresql` \
                 package (apt-get install -y postgresql) or set SWITCHBOARD_PG_BIN"
            ),
        })
    }

    /// A new cluster of its own (for tests that crash or stop it).
    pub fn start() -> io::Result<Cluster> {
        Cluster::start_with(None)
    }

    /// A new cluster that accepts TLS (`ssl = on`) with this certificate
    /// chain and key (PEM); plain connections are still accepted.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> io::Result<Cluster> {
        Cluster::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> io::Result<Cluster> {
        let bin = find_bin()?;
        remove_stale();
        let n = SCHEMAS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "switchboard-pg-{}-{n}-{}",
            std::process::id(),
            crate::clock::now_ms()
        ));
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::MetadataExt;
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let run_as = if root {
            let ids = user_ids("postgres").or_else(|| user_ids("nobody"));
            let Some((uid, gid)) = ids else {
                return Err(io::Error::other(
                    "running as root and neither user postgres nor nobody exists",
                ));
            };
            chown(&dir, uid, gid)?;
            Some((uid, gid))
        } else {
            None
        };
        let data = dir.join("data");
        let mut initdb = as_user(&bin.join("initdb"), run_as, false);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = initdb.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut settings = Vec::new();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert_path, cert)?;
            std::fs::write(&key_path, key)?;
            // PostgreSQL refuses a key others can read.
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = run_as {
                chown(&cert_path, uid, gid)?;
                chown(&key_path, uid, gid)?;
            }
            settings.push("ssl=on".to_owned());
            settings.push(format!("ssl_cert_file={}", cert_path.display()));
            settings.push(format!("ssl_key_file={}", key_path.display()));
        }
        let port = free_port()?;
        let c = Cluster {
            dir,
            port,
            run_as,
            bin,
            child: Mutex::new(None),
            settings,
        };
        c.launch()?;
        Ok(c)
    }

    /// `host=127.0.0.1 port=N user=postgres dbname=postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A schema name no other test of this process uses.
    pub fn fresh_schema(&self) -> String {
        format!(
            "t{}_{}",
            std::process::id(),
            SCHEMAS.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A client connection (for tests that look at the tables), with the
    /// search path set to `schema`.
    pub fn client(&self, schema: &str) -> Result<postgres::Client, postgres::Error> {
        let mut c = postgres::Client::connect(&self.url(), postgres::NoTls)?;
        c.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
        Ok(c)
    }

    /// SIGKILL the postmaster and every backend (its process group), and
    /// wait for the postmaster to be gone.
    pub fn kill9(&self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut c) = child.take()
        {
            signal(&format!("-{}", c.id()), "KILL");
            let _ = c.wait();
        }
    }

    /// Start the server again on the same directory and port (after
    /// [`kill9`](Cluster::kill9)): it runs crash recovery first.
    pub fn restart(&self) -> io::Result<()> {
        self.kill9();
        // Backends of a killed postmaster may take a moment to go; the new
        // postmaster refuses to start while they hold shared memory.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    log::debug!("test postgres restart: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn launch(&self) -> io::Result<()> {
        let mut cmd = as_user(&self.bin.join("postgres"), self.run_as, true);
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                // A test server: a crash of the process loses nothing
                // (the OS has the pages), only a power loss would.
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for setting in &self.settings {
            cmd.arg("-c").arg(setting);
        }
        let mut child = spawn(cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!("postgres exited: {status}")));
            }
            if postgres::Client::connect(&self.url(), postgres::NoTls).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(io::Error::other(
                    "postgres did not accept connections in 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(mut slot) = self.child.lock() {
            *slot = Some(child);
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock()
            && let Some(mut c) = child.take()
        {
            // SIGINT is PostgreSQL's fast shutdown.
            signal(&c.id().to_string(), "INT");
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `program` as (uid, gid) when set; `server`: in its own process group,
/// signalled when the spawning thread (the process) dies.
fn as_user(program: &Path, run_as: Option<(u32, u32)>, server: bool) -> Command {
    let mut cmd = Command::new("setpriv");
    if let Some((uid, gid)) = run_as {
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups");
    }
    if server {
        cmd.args(["--pdeathsig", "INT"]);
        cmd.process_group(0);
    }
    cmd.arg("--").arg(program);
    cmd
}

/// `kill -SIG target` (a pid, or `-pgid` for a process group).
fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// (uid, gid) of `name`, from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        let _password = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_bin() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "initdb and postgres not found (/usr/lib/postgresql/*/bin, PATH, SWITCHBOARD_PG_BIN)",
    ))
}

/// Directories of earlier test processes that are gone (a kill left them).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("switchboard-pg-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if pid != std::process::id().to_string() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
