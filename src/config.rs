//! Every option, its default and the reason for it.
//!
//! Precedence: CLI flags > environment > TOML file > defaults. Environment
//! names are `SWITCHBOARD_<OPTION>` (upper case, `SWITCHBOARD_TLS_CERT` for
//! `tls.cert`), plus the seeds' `HOST`, `PORT`, `WS_PATH`,
//! `WS_HEARTBEAT_INTERVAL` and `WS_SHUTDOWN_TIMEOUT`.
//! Durations are written `"30s"`, `"500ms"`, `"2m"`, or as a bare number of
//! milliseconds (the seeds' `heartbeatInterval: 30000`).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// How accepted sockets reach the shards (see docs/ARCHITECTURE.md for the measurement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptMode {
    /// One acceptor thread hands sockets to the shards in turn (round robin).
    Acceptor,
    /// Every shard has its own SO_REUSEPORT listener; the kernel spreads connections.
    Reuseport,
}

/// A block of addresses: `10.0.0.0/8`, `2001:db8::/32`, or one address
/// (`192.0.2.7`, a /32 or /128). Written and printed as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Is `ip` inside the block? IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
    /// what a dual-stack listener reports) count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or address/prefix"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: development only (refused on public addresses unless allowed).
    /// The user id is `?userId=` or `anon-<connectionId>`.
    None,
    /// One shared secret token (seed 000 `authToken`).
    Token,
    /// JWTs signed by the application (`[auth.jwt]`).
    Jwt,
}

/// Who may do something on a channel (or send directly, or broadcast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Any authenticated connection.
    Any,
    /// Only if a pattern in the token's `channels` claim matches.
    Claims,
    /// `<ns>:<userId>` (and below it) for that user only.
    Owner,
    /// `<ns>:<tenant>` (and below it) for that tenant only (`tenant` claim).
    Tenant,
    /// Only `role: admin`.
    Admin,
    /// Nobody but admins.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceRules {
    pub subscribe: Rule,
    pub publish: Rule,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Longest channel name in bytes.
    pub max_channel_length: usize,
    /// Rule for channels whose namespace has no entry: claims only, so
    /// nothing is open unless the token or config says so.
    pub subscribe: Rule,
    pub publish: Rule,
    /// Who may broadcast to every connection from a client.
    pub broadcast: Rule,
    /// Who may send direct messages to a user.
    pub direct: Rule,
    /// Rules per namespace (the part of a channel name before the first `:`):
    /// the built-in `public`, `user` and `tenant` plus what the file adds
    /// or overrides, merged per namespace and per field (`merge_namespaces`).
    pub namespaces: std::collections::BTreeMap<String, NamespaceRules>,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        let mut namespaces = std::collections::BTreeMap::new();
        namespaces.insert(
            "public".into(),
            NamespaceRules {
                subscribe: Rule::Any,
                publish: Rule::Any,
            },
        );
        namespaces.insert(
            "user".into(),
            NamespaceRules {
                subscribe: Rule::Owner,
                publish: Rule::Admin,
            },
        );
        namespaces.insert(
            "tenant".into(),
            NamespaceRules {
                subscribe: Rule::Tenant,
                publish: Rule::Admin,
            },
        );
        ChannelsConfig {
            max_subscriptions: 128,
            max_channel_length: 255,
            subscribe: Rule::Claims,
            publish: Rule::Claims,
            broadcast: Rule::Admin,
            direct: Rule::Any,
            namespaces,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Client messages per second per connection; 0 = unlimited.
    pub messages_per_second: u32,
    /// Messages a connection may send in a burst above the rate.
    pub burst: u32,
    /// Tokens a `history` or `presence` request takes from the bucket: they
    /// make other shards work and may answer with megabytes.
    pub request_cost: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            messages_per_second: 0,
            burst: 50,
            request_cost: 10,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key`, the listener speaks TLS (wss://).
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// Where durable state lives (docs/STORAGE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Embedded SQLite in WAL mode under `storage.data_dir` (the default).
    Sqlite,
    /// A PostgreSQL database (`[storage.postgres]`), which several nodes can share.
    Postgres,
    /// Nothing durable: history lives in memory only, sensor ingestion and
    /// the offline inbox are refused, revocations last until restart.
    None,
}

/// When a commit is durable. SQLite: fsync per commit or not. PostgreSQL:
/// `synchronous_commit` `on` or `off` (docs/STORAGE.md, "Where the backends differ").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every group commit: an acknowledged record survives a power loss.
    Full,
    /// WAL without fsync per commit: survives a process crash (kill -9), not a power loss.
    Normal,
}

/// What the database file is checked for at start (`storage.integrity_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IntegrityCheck {
    /// SQLite's `quick_check`: every page and b-tree is readable and well
    /// formed (catches truncation and overwritten pages); indexes are not
    /// compared with their tables.
    Quick,
    /// SQLite's `integrity_check`: `quick` plus every index entry against its row.
    Full,
    /// No check: damage shows up later as failed writes (`storage_error`).
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Directory of the database file `switchboard.db` (created if missing).
    pub data_dir: PathBuf,
    /// Requests queued for the writer thread; past it clients get `overloaded`.
    pub queue_capacity: usize,
    /// Bytes of requests queued for the writer (records, publications,
    /// inbox messages); past it clients get `overloaded` too, so a flood of
    /// large requests holds at most this much.
    pub queue_bytes: usize,
    /// Most requests written in one transaction (group commit).
    pub max_batch: usize,
    pub synchronous: SyncMode,
    /// Checked at start; a damaged file refuses the start (docs/STORAGE.md).
    pub integrity_check: IntegrityCheck,
    /// The PostgreSQL backend (`backend = "postgres"`).
    pub postgres: PostgresConfig,
}

/// How the connection to PostgreSQL is protected (`storage.postgres.tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgTls {
    /// Plain TCP or a Unix socket (a database on the same host or a private network).
    Disable,
    /// TLS (rustls), the server's certificate verified against `ca_file` and
    /// its host name: libpq's `sslmode=verify-full`. There is no weaker TLS
    /// mode: encryption without verification does not stop an impostor.
    VerifyFull,
}

/// `[storage.postgres]`: where the database is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection string, `postgres://user:pass@host:port/db` or
    /// `host=... user=... dbname=...` (or env SWITCHBOARD_STORAGE_POSTGRES_URL).
    /// Its own `sslmode` is ignored: `tls` decides.
    pub url: String,
    /// Schema holding every table (created if missing).
    pub schema: String,
    pub tls: PgTls,
    /// PEM file of the certificate authorities trusted with `tls = "verify-full"`.
    pub ca_file: Option<PathBuf>,
    /// How long one connection attempt may take.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// At start, how long to keep retrying an unreachable database before
    /// giving up (exit 2). 0: give up at the first failure.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub start_retry: Duration,
    /// Longest wait between reconnection attempts after the connection was lost.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub reconnect_max: Duration,
    /// The server cancels a statement running longer (PostgreSQL's
    /// `statement_timeout`); its batch is answered `storage_error`. 0: no limit.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub statement_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://switchboard@localhost/switchboard".into(),
            schema: "switchboard".into(),
            tls: PgTls::Disable,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            start_retry: Duration::ZERO,
            reconnect_max: Duration::from_secs(5),
            // Long enough for a batch of `max_batch` records on a busy
            // server, short enough that a stuck database is noticed.
            statement_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Sqlite,
            data_dir: PathBuf::from("./data"),
            queue_capacity: 65_536,
            queue_bytes: 64 << 20,
            max_batch: 4096,
            synchronous: SyncMode::Full,
            // Cheap (one read of the file) and catches what loses records;
            // `full` costs several times more on a large table.
            integrity_check: IntegrityCheck::Quick,
            postgres: PostgresConfig::default(),
        }
    }
}

/// A JSON type a field of an ingested record may be required to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Number,
    Boolean,
    Object,
    Array,
}

/// Sensor-data ingestion (seed 000 `dbTableName`, `requiredFields`, `fieldsToEncrypt`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Message types stored as records (the client gets `ack` after the commit).
    pub types: Vec<String>,
    /// Table the records go to (seed `dbTableName`).
    pub table: String,
    /// Check `required_fields` and `field_types` (seed `enableDataValidation`).
    pub validate: bool,
    /// Fields that must be present in `data` (seed `requiredFields`).
    pub required_fields: Vec<String>,
    /// Optional JSON type per field of `data`.
    pub field_types: std::collections::BTreeMap<String, FieldType>,
    /// Fields of `data` encrypted with AES-256-GCM before storage (seed `fieldsToEncrypt`).
    pub fields_to_encrypt: Vec<String>,
    /// The current key: 32 bytes, base64 (or env SWITCHBOARD_INGEST_KEY).
    pub key: Option<String>,
    /// Its id, stored beside every ciphertext so keys can rotate.
    pub key_id: String,
    /// Earlier keys (id -> base64), kept to decrypt older records.
    pub old_keys: std::collections::BTreeMap<String, String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            types: vec!["sensor_data".into()],
            table: "sensors_data".into(),
            validate: true,
            required_fields: Vec::new(),
            field_types: std::collections::BTreeMap::new(),
            fields_to_encrypt: Vec::new(),
            key: None,
            key_id: "k1".into(),
            old_keys: std::collections::BTreeMap::new(),
        }
    }
}

/// History kept for one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// Publications kept per channel; 0 = none.
    pub size: usize,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ttl: Duration,
}

/// Channel history and recovery (seed 001 "event history").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Publications kept per channel (seed 001: the last 100); 0 = none.
    pub size: usize,
    /// How long a publication stays recoverable.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ttl: Duration,
    /// Overrides per namespace; a field a namespace table leaves out takes
    /// the global value above when the file is read (`merge_namespaces`).
    pub namespaces: std::collections::BTreeMap<String, HistoryRule>,
    /// Most publications one `history` request or recovery returns.
    pub max_page: usize,
    /// Bytes of kept publications (their JSON text) for all channels
    /// together, in memory (each shard holds at most its share) and on disk;
    /// past it the oldest publications go first, whatever their channel.
    pub max_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 100,
            ttl: Duration::from_secs(3600),
            namespaces: std::collections::BTreeMap::new(),
            max_page: 1000,
            // 64 MiB: the default 100 publications of 1 KiB on 650 busy
            // channels; without it, 300 channels of 1 MB publications held
            // 300 MiB for an hour and were reloaded at every start.
            max_bytes: 64 << 20,
        }
    }
}

impl HistoryConfig {
    /// The rule for `channel` (its namespace's, or the default).
    pub fn rule(&self, channel: &str) -> HistoryRule {
        let ns = channel.split_once(':').map_or("", |(ns, _)| ns);
        self.namespaces.get(ns).copied().unwrap_or(HistoryRule {
            size: self.size,
            ttl: self.ttl,
        })
    }
}

/// Offline inbox and acknowledged delivery (M4, M7).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// How long an unacknowledged message is kept.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ttl: Duration,
    /// First redelivery of an unacknowledged message; doubles each time.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub retry_initial: Duration,
    /// Longest wait between redeliveries.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub retry_max: Duration,
    /// Messages kept per user; past it (or `max_bytes_per_user`) the oldest
    /// go first, but a user's message never pushes out one the backend sent.
    pub max_per_user: usize,
    /// Bytes kept per user (with `max_per_user`).
    pub max_bytes_per_user: usize,
    /// Bytes of undelivered messages one user may have stored, to all
    /// recipients together; past it that user's messages are refused
    /// (`inbox_full`). The backend (HTTP API) has no such quota.
    pub max_bytes_per_sender: usize,
    /// Messages a connection may store per second (direct messages to
    /// offline users or with `ack`); 0 = unlimited. Past it: `rate_limited`.
    pub stored_per_second: u32,
    /// Stored messages a connection may send in a burst above the rate.
    pub stored_burst: u32,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            ttl: Duration::from_secs(7 * 86_400),
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            max_per_user: 1000,
            max_bytes_per_user: 1 << 20,
            max_bytes_per_sender: 1 << 20,
            stored_per_second: 10,
            stored_burst: 50,
        }
    }
}

/// Socket.IO v4 compatibility (docs/SOCKETIO.md): Engine.IO v4 over the
/// WebSocket transport with Socket.IO v5 on top, beside the native protocol.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketIoConfig {
    /// Serve Socket.IO clients at `path`.
    pub enabled: bool,
    /// socket.io-client's default; matched with and without the trailing slash.
    pub path: String,
    /// Namespaces besides `/` that any authenticated client may join.
    pub namespaces: Vec<String>,
    /// Engine.IO `pingInterval`: the server pings this often (socket.io's default).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// Engine.IO `pingTimeout`: a ping not answered within this closes the session.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub ping_timeout: Duration,
    /// Engine.IO `maxPayload`: the largest packet accepted (socket.io's default 1e6).
    pub max_payload: usize,
    /// The echo applications the official protocol test suites expect
    /// (docs/SOCKETIO.md), instead of the mapping onto the native protocol:
    /// off in production, like `/echo` for Autobahn.
    pub conformance: bool,
    /// Every server message reaches Socket.IO clients as the `message`
    /// event carrying the native JSON as a string (seed 004's clients
    /// `JSON.parse` it), instead of an event named by its `type`.
    pub message_strings: bool,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        SocketIoConfig {
            enabled: true,
            path: "/socket.io/".into(),
            namespaces: Vec::new(),
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_payload: 1_000_000,
            conformance: false,
            message_strings: false,
        }
    }
}

impl SocketIoConfig {
    /// Is `path` the Socket.IO path (the client may drop the trailing slash)?
    pub fn serves(&self, path: &str) -> bool {
        self.enabled && path.trim_end_matches('/') == self.path.trim_end_matches('/')
    }

    /// Is `path` the plain Engine.IO echo of the conformance suites?
    pub fn serves_plain(&self, path: &str) -> bool {
        self.enabled && self.conformance && path.trim_end_matches('/') == "/engine.io"
    }

    /// May a client join namespace `nsp`?
    pub fn has_namespace(&self, nsp: &str) -> bool {
        nsp == "/" || self.namespaces.iter().any(|n| n == nsp)
    }
}

/// The HTTP API for backends (docs/API.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub enabled: bool,
    /// API keys accepted as `Authorization: Bearer <key>` or `X-API-Key`
    /// (or env SWITCHBOARD_API_KEY, one key). A JWT with `role: admin` works too.
    pub keys: Vec<String>,
    /// Serve the API without credentials (development only).
    pub allow_anonymous: bool,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Serve the web console at `/`.
    pub console: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            keys: Vec::new(),
            allow_anonymous: false,
            max_body_bytes: 1 << 20,
            console: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted algorithms (HS256/384/512, RS*, PS*, ES256/384, EdDSA).
    pub algorithms: Vec<String>,
    /// HMAC secret (HS*), as text.
    pub secret: Option<String>,
    /// HMAC secret, base64.
    pub secret_base64: Option<String>,
    /// Public key PEM file (RS*, PS*, ES*, EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// JWKS file (keys chosen by `kid`).
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew allowed on exp/nbf.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub leeway: Duration,
    /// Refuse tokens without `exp` (turn off only for tokens that never expire).
    pub require_exp: bool,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithms: vec!["HS256".into()],
            secret: None,
            secret_base64: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            require_exp: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The shared token for mode `token` (seed 000 `authToken`).
    pub token: Option<String>,
    /// Time allowed for an `authenticate` message when no token came with the upgrade.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// How long a revocation is kept: tokens of a revoked user issued
    /// (`iat`) before it, and a revoked token id, are refused for this long.
    /// Match your longest token lifetime.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub revocation_ttl: Duration,
    /// How long before an open connection's token expires it gets a
    /// `token_expiring` event (time to send `refresh` with a new token);
    /// 0 = no warning. The connection is closed (4004) when the token would
    /// no longer be accepted at login: `exp` plus `jwt.leeway`.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub expiry_warning: Duration,
    pub jwt: JwtConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            token: None,
            timeout: Duration::from_secs(10),
            revocation_ttl: Duration::from_secs(86_400),
            expiry_warning: Duration::from_secs(60),
            jwt: JwtConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Loopback by default: a newcomer's first run is not exposed to the network.
    pub host: String,
    /// 8080, as in the seeds.
    pub port: u16,
    /// Shard threads; 0 means one per available core.
    pub shards: usize,
    /// Where clients speak the Switchboard protocol (seed WS_PATH).
    pub ws_path: String,
    /// Raw echo endpoint for conformance tests and transport benchmarks.
    pub echo_path: String,
    /// The echo endpoint can be switched off in production.
    pub echo_enabled: bool,
    /// Acceptor thread by default: measured faster to spread load evenly (ARCHITECTURE.md).
    pub accept: AcceptMode,
    /// Open WebSocket connections across all shards; upgrades past it get HTTP 503.
    pub max_connections: usize,
    /// Largest frame payload (close 1009 past it). 1 MiB covers any chat or event payload.
    pub max_frame_size: usize,
    /// Largest reassembled message (close 1009 past it).
    pub max_message_size: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (1008).
    /// 4 MiB absorbs bursts of a busy channel without letting one reader hold the shard's memory.
    pub max_outbound_bytes: usize,
    /// Largest HTTP request head (431 past it). 8 KiB as common servers do.
    pub max_header_bytes: usize,
    /// Time allowed from accept to a complete upgrade request.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// Ping every interval (seed heartbeatInterval 30000 ms).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub heartbeat_interval: Duration,
    /// A ping not answered within this is a dead peer: close 1011.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub pong_timeout: Duration,
    /// Close connections that send nothing for this long; 0 switches it off (heartbeats already catch dead peers).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// How long a closing connection waits for the peer's close before the socket is dropped.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub close_timeout: Duration,
    /// Graceful shutdown deadline (seed WS_SHUTDOWN_TIMEOUT).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub shutdown_timeout: Duration,
    /// WebSocket upgrade requests per client IP per minute; 0 = unlimited
    /// (seed 001 uses 10). Plain HTTP requests (API, health checks, the
    /// console) do not count.
    pub per_ip_connections_per_minute: u32,
    /// Proxies (addresses or blocks) whose `Forwarded` / `X-Forwarded-For`
    /// header names the client. Empty by default: those headers are trusted
    /// from nobody, since any client can send them.
    pub trusted_proxies: Vec<Cidr>,
    /// Bytes read from one connection per wake-up before others get their turn.
    pub read_budget: usize,
    /// Largest unfinished message an unauthenticated WebSocket connection may
    /// hold, and largest HTTP body read before the caller's API key or token
    /// is checked. An `authenticate` message is tiny; the full limits
    /// (`max_message_size`, `api.max_body_bytes`) apply once authenticated.
    pub pre_auth_max_bytes: usize,
    /// Bytes of publications and messages queued for one shard by the others
    /// before new client publications or messages that need it are refused
    /// (`overloaded`): the queue between shards cannot grow without end.
    pub shard_queue_bytes: usize,
    /// Bytes of messages from other shards a shard handles per loop turn
    /// before it serves its own connections again (the rest waits a turn).
    pub shard_turn_bytes: usize,
    /// debug, info, warn, error (seed logLevel).
    pub log_level: String,
    /// text or json lines.
    pub log_format: LogFormat,
    /// Explicit consent to bind a non-loopback address with authentication off.
    pub allow_unauthenticated_public: bool,
    /// Browser origins allowed to connect (exact `Origin` values); empty = any.
    /// Requests without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub channels: ChannelsConfig,
    pub rate_limit: RateLimitConfig,
    pub storage: StorageConfig,
    pub ingest: IngestConfig,
    pub history: HistoryConfig,
    pub inbox: InboxConfig,
    pub api: ApiConfig,
    pub socketio: SocketIoConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "127.0.0.1".into(),
            port: 8080,
            shards: 0,
            ws_path: "/ws".into(),
            echo_path: "/echo".into(),
            echo_enabled: true,
            accept: AcceptMode::Acceptor,
            max_connections: 100_000,
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
            max_outbound_bytes: 4 << 20,
            max_header_bytes: 8 << 10,
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            close_timeout: Duration::from_secs(3),
            shutdown_timeout: Duration::from_secs(10),
            per_ip_connections_per_minute: 0,
            trusted_proxies: Vec::new(),
            read_budget: 256 << 10,
            pre_auth_max_bytes: 16 << 10,
            shard_queue_bytes: 8 << 20,
            shard_turn_bytes: 256 << 10,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            allow_unauthenticated_public: false,
            allowed_origins: Vec::new(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            channels: ChannelsConfig::default(),
            rate_limit: RateLimitConfig::default(),
            storage: StorageConfig::default(),
            ingest: IngestConfig::default(),
            history: HistoryConfig::default(),
            inbox: InboxConfig::default(),
            api: ApiConfig::default(),
            socketio: SocketIoConfig::default(),
        }
    }
}

/// A configuration problem, named precisely enough to fix it from one line.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        err: std::io::Error,
    },
    Parse {
        source: String,
        message: String,
    },
    Invalid {
        option: &'static str,
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, err } => {
                write!(f, "cannot read config file {}: {err}", path.display())
            }
            ConfigError::Parse { source, message } => {
                write!(f, "invalid configuration in {source}: {}", message.trim())
            }
            ConfigError::Invalid { option, message } => write!(f, "invalid {option}: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// CLI values that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub shards: Option<usize>,
    pub log_level: Option<String>,
}

/// Environment variables read, and the option each sets.
const ENV: &[(&str, &str)] = &[
    ("HOST", "host"),
    ("PORT", "port"),
    ("WS_PATH", "ws_path"),
    ("WS_HEARTBEAT_INTERVAL", "heartbeat_interval"),
    ("WS_SHUTDOWN_TIMEOUT", "shutdown_timeout"),
];

const OPTIONS: &[&str] = &[
    "host",
    "port",
    "shards",
    "ws_path",
    "echo_path",
    "echo_enabled",
    "accept",
    "max_connections",
    "max_frame_size",
    "max_message_size",
    "max_outbound_bytes",
    "max_header_bytes",
    "handshake_timeout",
    "heartbeat_interval",
    "pong_timeout",
    "idle_timeout",
    "close_timeout",
    "shutdown_timeout",
    "per_ip_connections_per_minute",
    "read_budget",
    "pre_auth_max_bytes",
    "shard_queue_bytes",
    "shard_turn_bytes",
    "log_level",
    "log_format",
    "allow_unauthenticated_public",
    "tls.cert",
    "tls.key",
    "auth.mode",
    "auth.token",
    "auth.timeout",
    "auth.expiry_warning",
    "auth.jwt.secret",
    "auth.jwt.secret_base64",
    "auth.jwt.public_key_file",
    "auth.jwt.jwks_file",
    "auth.jwt.issuer",
    "auth.jwt.audience",
    "auth.jwt.leeway",
    "auth.jwt.require_exp",
    "rate_limit.messages_per_second",
    "rate_limit.burst",
    "rate_limit.request_cost",
    "channels.max_subscriptions",
    "storage.backend",
    "storage.data_dir",
    "storage.queue_capacity",
    "storage.queue_bytes",
    "storage.max_batch",
    "storage.synchronous",
    "storage.integrity_check",
    "storage.postgres.url",
    "storage.postgres.schema",
    "storage.postgres.tls",
    "storage.postgres.ca_file",
    "storage.postgres.connect_timeout",
    "storage.postgres.start_retry",
    "storage.postgres.reconnect_max",
    "storage.postgres.statement_timeout",
    "ingest.table",
    "ingest.key",
    "ingest.key_id",
    "history.size",
    "history.ttl",
    "history.max_bytes",
    "inbox.ttl",
    "inbox.max_per_user",
    "inbox.max_bytes_per_user",
    "inbox.max_bytes_per_sender",
    "inbox.stored_per_second",
    "inbox.stored_burst",
    "api.enabled",
    "api.allow_anonymous",
    "api.max_body_bytes",
    "api.console",
    "socketio.enabled",
    "socketio.path",
    "socketio.ping_interval",
    "socketio.ping_timeout",
    "socketio.max_payload",
    "socketio.conformance",
    "socketio.message_strings",
];

fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(raw.to_owned())
    }
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        Some((head, rest)) => {
            let entry = table
                .entry(head)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                set_dotted(t, rest, value);
            }
        }
        None => {
            table.insert(key.to_owned(), value);
        }
    }
}

impl Config {
    /// Load from an optional file, then the process environment, then `cli`.
    pub fn load(file: Option<&std::path::Path>, cli: &Overrides) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_from(file, &env, cli)
    }

    /// As [`Config::load`] with an explicit environment (tests).
    pub fn load_from(
        file: Option<&std::path::Path>,
        env: &[(String, String)],
        cli: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
                    path: path.to_owned(),
                    err,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        source: path.display().to_string(),
                        message: toml_message(&text, &e),
                    })?
            }
            None => toml::Table::new(),
        };
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        // Seed names first so SWITCHBOARD_* wins when both are set.
        for (var, key) in ENV {
            if let Some(v) = lookup(var) {
                set_dotted(&mut table, key, env_value(v));
            }
        }
        for key in OPTIONS {
            let var = format!("SWITCHBOARD_{}", key.replace('.', "_").to_uppercase());
            if let Some(v) = lookup(&var) {
                let text_only = key.starts_with("tls.")
                    || *key == "host"
                    || *key == "log_level"
                    || *key == "auth.token"
                    || *key == "storage.data_dir"
                    || *key == "storage.postgres.url"
                    || *key == "storage.postgres.schema"
                    || *key == "storage.postgres.ca_file"
                    || *key == "socketio.path"
                    || *key == "ingest.table"
                    || *key == "ingest.key"
                    || *key == "ingest.key_id"
                    || (key.starts_with("auth.jwt.")
                        && *key != "auth.jwt.leeway"
                        && *key != "auth.jwt.require_exp");
                let value = if text_only {
                    toml::Value::String(v.to_owned())
                } else {
                    env_value(v)
                };
                set_dotted(&mut table, key, value);
            }
        }
        // A list from one variable: comma-separated blocks.
        if let Some(v) = lookup("SWITCHBOARD_TRUSTED_PROXIES") {
            let list = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect();
            table.insert("trusted_proxies".into(), toml::Value::Array(list));
        }
        merge_namespaces(&mut table);
        let source = if file.is_some() {
            "config file or environment"
        } else {
            "environment"
        };
        let mut cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                // The bare message: toml's Display adds "in `<key>`" on a
                // second line, and the path already names the key.
                ConfigError::Parse {
                    source: source.into(),
                    message: format!("{path}: {}", one_line(e.inner().message())),
                }
            })?;
        if let Some(k) = lookup("SWITCHBOARD_API_KEY").filter(|k| !k.is_empty()) {
            cfg.api.keys.push(k.to_owned());
        }
        if let Some(h) = &cli.host {
            cfg.host = h.clone();
        }
        if let Some(p) = cli.port {
            cfg.port = p;
        }
        if let Some(s) = cli.shards {
            cfg.shards = s;
        }
        if let Some(l) = &cli.log_level {
            cfg.log_level = l.clone();
        }
        if cfg.shards == 0 {
            cfg.shards = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every option; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |option: &'static str, message: String| Err(ConfigError::Invalid { option, message });
        let ip: IpAddr = match self.host.parse() {
            Ok(ip) => ip,
            Err(_) if self.host == "localhost" => IpAddr::from([127, 0, 0, 1]),
            Err(_) => return bad("host", format!("{:?} is not an IP address", self.host)),
        };
        if !(1..=crate::id::MAX_SHARDS).contains(&self.shards) {
            return bad(
                "shards",
                format!("{} is outside 1..={}", self.shards, crate::id::MAX_SHARDS),
            );
        }
        for (name, p) in [("ws_path", &self.ws_path), ("echo_path", &self.echo_path)] {
            if !p.starts_with('/') || p.contains('?') || p.contains(' ') {
                return bad(name, format!("{p:?} must be an absolute path like /ws"));
            }
        }
        if self.echo_enabled && self.ws_path == self.echo_path {
            return bad("echo_path", format!("{:?} is also ws_path", self.echo_path));
        }
        let sio = &self.socketio;
        if sio.enabled {
            let p = &sio.path;
            if !p.starts_with('/')
                || p.contains('?')
                || p.contains(' ')
                || p.trim_matches('/').is_empty()
            {
                return bad(
                    "socketio.path",
                    format!("{p:?} must be an absolute path like /socket.io/"),
                );
            }
            if sio.serves(&self.ws_path) || (self.echo_enabled && sio.serves(&self.echo_path)) {
                return bad(
                    "socketio.path",
                    format!("{p:?} is also ws_path or echo_path"),
                );
            }
            for ns in &sio.namespaces {
                if !ns.starts_with('/')
                    || ns.len() > 128 // proto::socketio::MAX_NAMESPACE_LEN (config imports only id)
                    || ns.contains(',')
                    || ns.chars().any(char::is_control)
                {
                    return bad(
                        "socketio.namespaces",
                        format!("{ns:?} must start with / and hold no comma (at most 128 bytes)"),
                    );
                }
            }
            for (name, d) in [
                ("socketio.ping_interval", sio.ping_interval),
                ("socketio.ping_timeout", sio.ping_timeout),
            ] {
                if d.is_zero() || d > Duration::from_secs(86_400) {
                    return bad(name, format!("{d:?} is outside (0, 1 day]"));
                }
            }
            if sio.max_payload == 0 {
                return bad("socketio.max_payload", "must be greater than 0".into());
            }
        }
        for (name, v) in [
            ("max_connections", self.max_connections),
            ("max_frame_size", self.max_frame_size),
            ("max_message_size", self.max_message_size),
            ("max_outbound_bytes", self.max_outbound_bytes),
            ("read_budget", self.read_budget),
            ("pre_auth_max_bytes", self.pre_auth_max_bytes),
            ("shard_queue_bytes", self.shard_queue_bytes),
            ("shard_turn_bytes", self.shard_turn_bytes),
        ] {
            if v == 0 {
                return bad(name, "must be greater than 0".into());
            }
        }
        if self.max_header_bytes < 256 {
            return bad("max_header_bytes", "must be at least 256".into());
        }
        if self.pre_auth_max_bytes < 1024 {
            // An `authenticate` message carries a token: leave it room.
            return bad("pre_auth_max_bytes", "must be at least 1024".into());
        }
        const DAY: Duration = Duration::from_secs(86_400);
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
            ("pong_timeout", self.pong_timeout),
            ("close_timeout", self.close_timeout),
            ("auth.timeout", self.auth.timeout),
        ] {
            if d.is_zero() || d > DAY {
                return bad(name, format!("{d:?} is outside (0, 1 day]"));
            }
        }
        for (name, d) in [
            ("idle_timeout", self.idle_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("auth.jwt.leeway", self.auth.jwt.leeway),
            ("auth.expiry_warning", self.auth.expiry_warning),
        ] {
            if d > DAY {
                return bad(name, format!("{d:?} is over 1 day"));
            }
        }
        const YEAR: Duration = Duration::from_secs(366 * 86_400);
        for (name, d) in [
            ("auth.revocation_ttl", self.auth.revocation_ttl),
            ("history.ttl", self.history.ttl),
            ("inbox.ttl", self.inbox.ttl),
            ("inbox.retry_initial", self.inbox.retry_initial),
            ("inbox.retry_max", self.inbox.retry_max),
        ] {
            if d.is_zero() || d > YEAR {
                return bad(name, format!("{d:?} is outside (0, 366 days]"));
            }
        }
        for (ns, rule) in &self.history.namespaces {
            if rule.ttl.is_zero() || rule.ttl > YEAR {
                return bad(
                    "history.namespaces",
                    format!("{ns}: ttl {:?} is outside (0, 366 days]", rule.ttl),
                );
            }
        }
        for (name, v) in [
            ("storage.queue_capacity", self.storage.queue_capacity),
            ("storage.queue_bytes", self.storage.queue_bytes),
            ("storage.max_batch", self.storage.max_batch),
            ("history.max_page", self.history.max_page),
            ("history.max_bytes", self.history.max_bytes),
            ("inbox.max_per_user", self.inbox.max_per_user),
            ("inbox.max_bytes_per_user", self.inbox.max_bytes_per_user),
            (
                "inbox.max_bytes_per_sender",
                self.inbox.max_bytes_per_sender,
            ),
            ("api.max_body_bytes", self.api.max_body_bytes),
        ] {
            if v == 0 {
                return bad(name, "must be greater than 0".into());
            }
        }
        let ident = |t: &str| {
            t.len() <= 64
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        if self.storage.backend == StorageBackend::Postgres {
            let pg = &self.storage.postgres;
            if !ident(&pg.schema) {
                return bad(
                    "storage.postgres.schema",
                    format!(
                        "{:?} must be a SQL identifier (letters, digits, _)",
                        pg.schema
                    ),
                );
            }
            if pg.url.trim().is_empty() {
                return bad("storage.postgres.url", "must not be empty".into());
            }
            if pg.tls == PgTls::VerifyFull && pg.ca_file.is_none() {
                return bad(
                    "storage.postgres.ca_file",
                    "tls = \"verify-full\" needs the certificate authorities to trust".into(),
                );
            }
            for (name, d) in [
                ("storage.postgres.connect_timeout", pg.connect_timeout),
                ("storage.postgres.reconnect_max", pg.reconnect_max),
            ] {
                if d.is_zero() || d > DAY {
                    return bad(name, format!("{d:?} is outside (0, 1 day]"));
                }
            }
            for (name, d) in [
                ("storage.postgres.start_retry", pg.start_retry),
                ("storage.postgres.statement_timeout", pg.statement_timeout),
            ] {
                if d > DAY {
                    return bad(name, format!("{d:?} is over 1 day"));
                }
            }
        }
        if !ident(&self.ingest.table) {
            return bad(
                "ingest.table",
                format!(
                    "{:?} must be a SQL identifier (letters, digits, _)",
                    self.ingest.table
                ),
            );
        }
        if let Some(k) = &self.ingest.key
            && decode_key(k).is_none()
        {
            return bad(
                "ingest.key",
                "must be 32 bytes in base64 (try: head -c32 /dev/urandom | base64)".into(),
            );
        }
        for (id, k) in &self.ingest.old_keys {
            if decode_key(k).is_none() {
                return bad(
                    "ingest.old_keys",
                    format!("{id}: must be 32 bytes in base64"),
                );
            }
        }
        if !self.ingest.fields_to_encrypt.is_empty() && self.ingest.key.is_none() {
            return bad(
                "ingest.key",
                "ingest.fields_to_encrypt is set but no key is configured".into(),
            );
        }
        if parse_level(&self.log_level).is_none() {
            return bad(
                "log_level",
                format!("{:?}: use debug, info, warn or error", self.log_level),
            );
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return bad("tls.key", "tls.cert is set but tls.key is not".into()),
            (None, Some(_)) => return bad("tls.cert", "tls.key is set but tls.cert is not".into()),
            _ => {}
        }
        if self.auth.mode == AuthMode::Token && self.auth.token.as_deref().is_none_or(str::is_empty)
        {
            return bad(
                "auth.token",
                "auth.mode is \"token\" but auth.token is empty".into(),
            );
        }
        if self.channels.max_subscriptions == 0 || self.channels.max_channel_length == 0 {
            return bad(
                "channels",
                "max_subscriptions and max_channel_length must be > 0".into(),
            );
        }
        if !ip.is_loopback()
            && self.auth.mode == AuthMode::None
            && !self.allow_unauthenticated_public
        {
            return bad(
                "host",
                format!(
                    "{ip} is not a loopback address and auth.mode is \"none\"; configure authentication or set allow_unauthenticated_public = true"
                ),
            );
        }
        Ok(())
    }

    /// The address to bind.
    pub fn bind_ip(&self) -> IpAddr {
        if self.host == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.host.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]))
        }
    }
}

/// Fill in what per-namespace tables leave out, before serde sees them, so
/// that they mean what the README says:
/// * `[channels.namespaces.<ns>]` adds to the built-in `public`, `user` and
///   `tenant` rules instead of replacing all of them (serde's `default`
///   takes a map whole: copying the README's `[channels.namespaces.room]`
///   used to make `public:*` and `user:*` claims-only). A rule the table
///   leaves out keeps the built-in one of that namespace, or for a new
///   namespace `channels.subscribe` / `channels.publish`.
/// * `[history.namespaces.<ns>]` fields left out take `history.size` /
///   `history.ttl` (a table with only `size` used to refuse to start).
///
/// Done on the TOML table (after the environment is applied, so its values
/// are the fallbacks too); a value of the wrong type is left for serde to
/// report with its path.
fn merge_namespaces(table: &mut toml::Table) {
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Config::default()) else {
        return;
    };
    let section = |t: &toml::Table, name: &str| -> toml::Table {
        t.get(name)
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default()
    };
    // The value of `key` in the file's section, else the default's.
    let pick = |file: &toml::Table, dflt: &toml::Table, keys: &[&str]| -> toml::Table {
        keys.iter()
            .filter_map(|k| {
                let v = file.get(*k).or_else(|| dflt.get(*k))?;
                Some(((*k).to_owned(), v.clone()))
            })
            .collect()
    };
    let overlay = |base: &toml::Table, over: &toml::Table| -> toml::Table {
        let mut t = base.clone();
        t.extend(over.iter().map(|(k, v)| (k.clone(), v.clone())));
        t
    };

    let default_channels = section(&defaults, "channels");
    if let Some(toml::Value::Table(channels)) = table.get_mut("channels") {
        let fallback = pick(channels, &default_channels, &["subscribe", "publish"]);
        let builtin = section(&default_channels, "namespaces");
        if let Some(toml::Value::Table(file)) = channels.get_mut("namespaces") {
            let mut merged: toml::Table = builtin.clone();
            for (ns, rules) in file.iter() {
                let value = match rules {
                    toml::Value::Table(rules) => {
                        let base = builtin
                            .get(ns)
                            .and_then(toml::Value::as_table)
                            .unwrap_or(&fallback);
                        toml::Value::Table(overlay(base, rules))
                    }
                    other => other.clone(),
                };
                merged.insert(ns.clone(), value);
            }
            *file = merged;
        }
    }

    let default_history = section(&defaults, "history");
    if let Some(toml::Value::Table(history)) = table.get_mut("history") {
        let fallback = pick(history, &default_history, &["size", "ttl"]);
        if let Some(toml::Value::Table(file)) = history.get_mut("namespaces") {
            for (_, rules) in file.iter_mut() {
                if let toml::Value::Table(r) = rules {
                    let merged = overlay(&fallback, r);
                    *r = merged;
                }
            }
        }
    }
}

/// A TOML syntax error on one line: where, then what (toml's own Display
/// draws the offending line with a caret over several lines).
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let what = one_line(e.message());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what,
    }
}

/// Messages from serde and toml may span lines; a start error is one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parse `"30s"`, `"250ms"`, `"2m"`, or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Ms(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Ms(ms) => Ok(Duration::from_millis(ms)),
        Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// `debug`, `info`, `warn`/`warning`, `error` (the seed's levels), plus `trace` and `off`.
pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "trace" => Some(log::LevelFilter::Trace),
        "debug" => Some(log::LevelFilter::Debug),
        "info" => Some(log::LevelFilter::Info),
        "warn" | "warning" => Some(log::LevelFilter::Warn),
        "error" => Some(log::LevelFilter::Error),
        "off" => Some(log::LevelFilter::Off),
        _ => None,
    }
}

/// A 32-byte AES-256 key from base64 (standard or URL-safe alphabet).
pub fn decode_key(b64: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let b64 = b64.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64))
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_validate() {
        let c = Config::load_from(None, &[], &Overrides::default()).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.host, "127.0.0.1");
        assert!(c.shards >= 1);
    }

    #[test]
    fn precedence_flags_env_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "port = 9000\nws_path = \"/file\"\nheartbeat_interval = \"5s\"\nshards = 3\n[tls]\n",
        )
        .unwrap();
        let e = env(&[
            ("WS_PATH", "/seed"),
            ("SWITCHBOARD_SHARDS", "2"),
            ("WS_HEARTBEAT_INTERVAL", "30000"),
            ("PORT", "9100"),
        ]);
        let cli = Overrides {
            port: Some(9200),
            ..Overrides::default()
        };
        let c = Config::load_from(Some(&path), &e, &cli).unwrap();
        assert_eq!(c.port, 9200, "flag beats env and file");
        assert_eq!(c.ws_path, "/seed", "env beats file");
        assert_eq!(c.shards, 2);
        assert_eq!(
            c.heartbeat_interval,
            Duration::from_secs(30),
            "bare number is ms"
        );
        let both = env(&[("WS_PATH", "/seed"), ("SWITCHBOARD_WS_PATH", "/sb")]);
        let c = Config::load_from(None, &both, &Overrides::default()).unwrap();
        assert_eq!(c.ws_path, "/sb");
    }

    #[test]
    fn errors_name_the_option() {
        let cases = [
            (env(&[("SWITCHBOARD_SHARDS", "0x")]), "shards"),
            (env(&[("WS_PATH", "nope")]), "ws_path"),
            (env(&[("SWITCHBOARD_LOG_LEVEL", "loud")]), "log_level"),
            (env(&[("HOST", "0.0.0.0")]), "host"),
            (env(&[("SWITCHBOARD_TLS_CERT", "/x.pem")]), "tls.key"),
            (
                env(&[("WS_HEARTBEAT_INTERVAL", "soon")]),
                "heartbeat_interval",
            ),
            (
                env(&[("SWITCHBOARD_MAX_FRAME_SIZE", "0")]),
                "max_frame_size",
            ),
            (
                env(&[("SWITCHBOARD_PRE_AUTH_MAX_BYTES", "100")]),
                "pre_auth_max_bytes",
            ),
            (
                env(&[("SWITCHBOARD_SHARD_QUEUE_BYTES", "0")]),
                "shard_queue_bytes",
            ),
            (
                env(&[("SWITCHBOARD_STORAGE_QUEUE_BYTES", "0")]),
                "storage.queue_bytes",
            ),
            (
                env(&[("SWITCHBOARD_INBOX_MAX_BYTES_PER_SENDER", "0")]),
                "inbox.max_bytes_per_sender",
            ),
        ];
        for (e, word) in cases {
            let err = Config::load_from(None, &e, &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(word), "{err} should name {word}");
        }
        let ok = env(&[
            ("HOST", "0.0.0.0"),
            ("SWITCHBOARD_ALLOW_UNAUTHENTICATED_PUBLIC", "true"),
        ]);
        assert!(Config::load_from(None, &ok, &Overrides::default()).is_ok());
    }

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_from(Some(&path), &[], &Overrides::default())
    }

    #[test]
    fn namespace_tables_add_to_the_built_in_rules() {
        // The README's example: one namespace table must leave public, user
        // and tenant as they were.
        let c =
            load_toml("[channels.namespaces.room]\nsubscribe = \"claims\"\npublish = \"claims\"\n")
                .unwrap();
        let ns = &c.channels.namespaces;
        let defaults = ChannelsConfig::default().namespaces;
        for name in ["public", "user", "tenant"] {
            assert_eq!(ns.get(name), defaults.get(name), "{name} kept");
        }
        assert_eq!(
            ns.get("room"),
            Some(&NamespaceRules {
                subscribe: Rule::Claims,
                publish: Rule::Claims
            })
        );
        // Per field: overriding one rule of a built-in namespace keeps the
        // other; a new namespace's missing field is the [channels] default.
        let c = load_toml(
            "[channels]\npublish = \"admin\"\n[channels.namespaces.public]\nsubscribe = \"claims\"\n[channels.namespaces.chat]\nsubscribe = \"any\"\n",
        )
        .unwrap();
        let ns = &c.channels.namespaces;
        assert_eq!(
            ns.get("public"),
            Some(&NamespaceRules {
                subscribe: Rule::Claims,
                publish: Rule::Any
            })
        );
        assert_eq!(
            ns.get("chat"),
            Some(&NamespaceRules {
                subscribe: Rule::Any,
                publish: Rule::Admin
            })
        );
        // `switchboard config` prints the merged result, and it reads back the same.
        let printed = toml::to_string_pretty(&c).unwrap();
        assert!(printed.contains("[channels.namespaces.user]"), "{printed}");
        assert_eq!(load_toml(&printed).unwrap(), c);
    }

    #[test]
    fn history_namespace_fields_fall_back_to_the_global_values() {
        let c = load_toml(
            "[history]\nsize = 7\nttl = \"2h\"\n[history.namespaces.chat]\nsize = 5\n[history.namespaces.log]\nttl = \"10m\"\n",
        )
        .unwrap();
        assert_eq!(
            c.history.rule("chat:1"),
            HistoryRule {
                size: 5,
                ttl: Duration::from_secs(7200)
            }
        );
        assert_eq!(
            c.history.rule("log:1"),
            HistoryRule {
                size: 7,
                ttl: Duration::from_secs(600)
            }
        );
        assert_eq!(c.history.rule("other:1").size, 7);
        let printed = toml::to_string_pretty(&c).unwrap();
        assert_eq!(load_toml(&printed).unwrap(), c);
        // The environment's global value is the fallback too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[history.namespaces.chat]\nsize = 5\n").unwrap();
        let e = env(&[("SWITCHBOARD_HISTORY_TTL", "3m")]);
        let c = Config::load_from(Some(&path), &e, &Overrides::default()).unwrap();
        assert_eq!(c.history.rule("chat:x").ttl, Duration::from_secs(180));
        // A bad field is still named.
        let err = load_toml("[history.namespaces.chat]\nttl = \"soon\"\n").unwrap_err();
        assert!(
            err.to_string().contains("history.namespaces.chat.ttl"),
            "{err}"
        );
    }

    #[test]
    fn trusted_proxies_are_address_blocks() {
        let c = load_toml("trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n")
            .unwrap();
        let [net, one, v6] = c.trusted_proxies.as_slice() else {
            panic!("{:?}", c.trusted_proxies)
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net.contains(ip("10.200.0.1")));
        assert!(
            net.contains(ip("::ffff:10.1.2.3")),
            "IPv4-mapped counts as IPv4"
        );
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!(toml::to_string(&c).unwrap().contains("\"10.0.0.0/8\""));
        assert_eq!(load_toml(&toml::to_string(&c).unwrap()).unwrap(), c);
        assert!(
            Config::default().trusted_proxies.is_empty(),
            "trusted by nobody by default"
        );
        let e = env(&[("SWITCHBOARD_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7")]);
        let c = Config::load_from(None, &e, &Overrides::default()).unwrap();
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.trusted_proxies[1].contains(ip("192.0.2.7")));
        for bad in ["10.0.0.0/33", "proxy.local", "10.0.0.1/x"] {
            let err = load_toml(&format!("trusted_proxies = [\"{bad}\"]\n")).unwrap_err();
            assert!(err.to_string().contains("trusted_proxies"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "prot = 1\n").unwrap();
        let err = Config::load_from(Some(&path), &[], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }
}
