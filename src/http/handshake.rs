//! Parsing an HTTP/1.1 request head with httparse, and the responses to it.
//!
//! Sans-IO: `parse_request` gets the bytes received so far and says "need
//! more", "here is the request and how many bytes it used", or why it is bad.
//! Bytes after the head (a pipelined first WebSocket frame) stay with the
//! caller.

use std::fmt::Write as _;

/// Most headers one request may carry.
pub const MAX_HEADERS: usize = 64;

/// Why a request head was refused. Each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Not valid HTTP/1.x (400).
    Malformed,
    /// Head longer than the configured limit, or too many headers (431).
    HeadTooLarge,
    /// HTTP/1.0 or a method/target we cannot use (400 with a reason).
    BadVersion,
}

impl HttpError {
    pub fn response(self) -> Response {
        match self {
            HttpError::Malformed => Response::error(400, "Bad Request", "malformed HTTP request"),
            HttpError::HeadTooLarge => Response::error(
                431,
                "Request Header Fields Too Large",
                "request head too large",
            ),
            HttpError::BadVersion => Response::error(400, "Bad Request", "HTTP/1.1 required"),
        }
    }
}

/// The parts of a request head that Switchboard uses, owned (the bytes they
/// came from are the shard's scratch buffer).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// `Upgrade: websocket` present.
    pub upgrade_websocket: bool,
    /// `Connection` lists the `upgrade` token.
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    pub host: Option<String>,
    /// `X-API-Key`.
    pub api_key: Option<String>,
    /// `Content-Type`, as sent.
    pub content_type: Option<String>,
    /// `Content-Length` (0 when absent).
    pub content_length: usize,
    /// A `Transfer-Encoding` was given (we take only Content-Length bodies).
    pub transfer_encoding: bool,
    /// `Connection: close` was asked for.
    pub close: bool,
    /// Every `Forwarded` header (RFC 7239), joined with `,` in order.
    pub forwarded: Option<String>,
    /// Every `X-Forwarded-For` header, joined with `,` in order.
    pub x_forwarded_for: Option<String>,
}

impl Request {
    /// Is this request asking for a WebSocket upgrade at all?
    pub fn wants_upgrade(&self) -> bool {
        self.upgrade_websocket && self.connection_upgrade
    }

    /// Is the body declared as JSON (`Content-Type: application/json`, with
    /// any parameters)? A browser sends that type cross-site only after a
    /// CORS preflight, which this server never grants.
    pub fn json_body(&self) -> bool {
        self.content_type.as_deref().is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
        })
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        q.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// The addresses the proxies in front of us name, client first, one per
    /// hop: from `Forwarded` (its `for=` parameters) if present, else from
    /// `X-Forwarded-For`; `None` when the request has neither. A hop that is
    /// not an IP address (`unknown`, an obfuscated `_name`) is `None`.
    /// Whether to believe any of it is the caller's decision
    /// (`trusted_proxies`): a client can send these headers itself.
    pub fn forwarded_for(&self) -> Option<Vec<Option<std::net::IpAddr>>> {
        if let Some(f) = &self.forwarded {
            return Some(
                f.split(',')
                    .map(|element| {
                        element.split(';').find_map(|pair| {
                            let (k, v) = pair.split_once('=')?;
                            k.trim().eq_ignore_ascii_case("for").then(|| node_ip(v))
                        })?
                    })
                    .collect(),
            );
        }
        let x = self.x_forwarded_for.as_deref()?;
        Some(x.split(',').map(node_ip).collect())
    }

    /// The `Sec-WebSocket-Key` is 16 random bytes in base64: 24 characters
    /// ending in "==" (RFC 6455 4.2.1 item 5).
    pub fn ws_key_valid(&self) -> bool {
        self.ws_key.as_deref().is_some_and(|k| {
            k.len() == 24
                && k.ends_with("==")
                && k.bytes()
                    .take(22)
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        })
    }
}

/// A path segment, percent-decoded (`+` stays `+` in paths).
pub fn percent_decode_path(s: &str) -> String {
    percent_decode(&s.replace('+', "%2B"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                // Both bytes must be hex digits: from_str_radix alone would
                // also take a sign ("%+5").
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `[2001:db8::1]:4711`, optionally quoted (RFC 7239 6).
fn node_ip(v: &str) -> Option<std::net::IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    if let Ok(ip) = v.parse() {
        return Some(ip);
    }
    // IPv4 with a port (one colon; a bare IPv6 address parsed above).
    let (host, port) = v.split_once(':')?;
    port.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
    host.parse::<std::net::Ipv4Addr>().ok().map(Into::into)
}

/// Another line of a header that may repeat: joined as one list.
fn append(to: &mut Option<String>, value: &[u8]) {
    let Some(v) = text(value) else { return };
    match to {
        Some(list) => {
            list.push(',');
            list.push_str(&v);
        }
        None => *to = Some(v),
    }
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn text(value: &[u8]) -> Option<String> {
    std::str::from_utf8(value).ok().map(|s| s.trim().to_owned())
}

/// Parse the request head at the front of `buf`.
///
/// `Ok(None)`: incomplete, read more (unless `buf` already holds `max_head`
/// bytes, which is reported as [`HttpError::HeadTooLarge`]).
/// `Ok(Some((req, n)))`: the head took the first `n` bytes.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::Malformed),
    };
    let used = match status {
        httparse::Status::Partial => {
            return if buf.len() >= max_head {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        httparse::Status::Complete(n) => n,
    };
    if used > max_head {
        return Err(HttpError::HeadTooLarge);
    }
    if req.version != Some(1) {
        return Err(HttpError::BadVersion);
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed);
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let mut seen_length = false;
    let mut out = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        ..Request::default()
    };
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            out.upgrade_websocket |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            out.connection_upgrade |= has_token(h.value, "upgrade");
            out.close |= has_token(h.value, "close");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = text(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = text(h.value);
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = text(h.value);
        } else if name.eq_ignore_ascii_case("authorization") {
            out.authorization = text(h.value);
        } else if name.eq_ignore_ascii_case("host") {
            out.host = text(h.value);
        } else if name.eq_ignore_ascii_case("x-api-key") {
            out.api_key = text(h.value);
        } else if name.eq_ignore_ascii_case("content-type") {
            out.content_type = text(h.value);
        } else if name.eq_ignore_ascii_case("forwarded") {
            append(&mut out.forwarded, h.value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            append(&mut out.x_forwarded_for, h.value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            // One length, digits only (RFC 9110 8.6): anything else could
            // desynchronise a pipeline, so it is refused.
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match n {
                Some(n) if !seen_length || n == out.content_length => out.content_length = n,
                _ => return Err(HttpError::Malformed),
            }
            seen_length = true;
        }
    }
    Ok(Some((out, used)))
}

/// A complete response, ready to queue. Error responses close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub bytes: Vec<u8>,
}

impl Response {
    /// `101 Switching Protocols` for a validated upgrade.
    pub fn switching_protocols(ws_key: &str) -> Response {
        let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
        let bytes = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        Response { status: 101, bytes }
    }

    /// A plain-text error response that ends the connection.
    pub fn error(status: u16, reason: &str, body: &str) -> Response {
        Response::error_with(status, reason, body, &[])
    }

    /// Like [`Response::error`] with extra headers (`Allow`, `Retry-After`, ...).
    pub fn error_with(status: u16, reason: &str, body: &str, extra: &[(&str, &str)]) -> Response {
        let body = format!("{body}\n");
        Response::with_body(
            status,
            reason,
            "text/plain; charset=utf-8",
            body.as_bytes(),
            extra,
            true,
        )
    }

    /// A response on a keep-alive connection: `close` adds `Connection: close`.
    pub fn with_body(
        status: u16,
        reason: &str,
        content_type: &str,
        body: &[u8],
        extra: &[(&str, &str)],
        close: bool,
    ) -> Response {
        let mut s = format!("HTTP/1.1 {status} {reason}\r\n");
        for (k, v) in extra {
            let _ = write!(s, "{k}: {v}\r\n");
        }
        let _ = write!(
            s,
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        let mut bytes = s.into_bytes();
        bytes.extend_from_slice(body);
        Response { status, bytes }
    }

    /// JSON on a keep-alive connection.
    pub fn json(status: u16, body: &[u8], close: bool) -> Response {
        Response::with_body(
            status,
            reason_phrase(status),
            "application/json",
            body,
            &[],
            close,
        )
    }

    pub fn not_found() -> Response {
        Response::error(404, "Not Found", "not found")
    }

    pub fn method_not_allowed() -> Response {
        Response::error_with(
            405,
            "Method Not Allowed",
            "WebSocket endpoints accept GET only",
            &[("Allow", "GET")],
        )
    }

    pub fn upgrade_required() -> Response {
        Response::error_with(
            426,
            "Upgrade Required",
            "this endpoint speaks WebSocket (version 13) only",
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "13"),
            ],
        )
    }

    pub fn bad_key() -> Response {
        Response::error(400, "Bad Request", "missing or invalid Sec-WebSocket-Key")
    }

    pub fn at_capacity() -> Response {
        Response::error_with(
            503,
            "Service Unavailable",
            "connection limit reached",
            &[("Retry-After", "1")],
        )
    }

    pub fn rate_limited() -> Response {
        Response::error_with(
            429,
            "Too Many Requests",
            "too many connections from this address",
            &[("Retry-After", "60")],
        )
    }

    pub fn shutting_down() -> Response {
        Response::error_with(503, "Service Unavailable", "server shutting down", &[])
    }
}

/// The reason phrase for the statuses we send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"GET /echo?token=a%20b&x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://o\r\n\r\n";

    #[test]
    fn parses_upgrade_and_keeps_trailing_bytes() {
        let mut buf = REQ.to_vec();
        buf.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let (req, used) = parse_request(&buf, 8192).unwrap().unwrap();
        assert_eq!(used, REQ.len());
        assert_eq!(req.path, "/echo");
        assert_eq!(req.query_param("token").as_deref(), Some("a b"));
        assert_eq!(req.query_param("x").as_deref(), Some("1"));
        assert!(req.wants_upgrade());
        assert!(req.ws_key_valid());
        assert_eq!(req.ws_version.as_deref(), Some("13"));
        assert_eq!(req.origin.as_deref(), Some("http://o"));
    }

    #[test]
    fn every_prefix_is_partial() {
        for cut in 0..REQ.len() {
            assert_eq!(parse_request(&REQ[..cut], 8192), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(parse_request(REQ, 50), Err(HttpError::HeadTooLarge));
        let partial = vec![b'G'; 0]
            .into_iter()
            .chain(b"GET / HTTP/1.1\r\nX: ".iter().copied());
        let mut long: Vec<u8> = partial.collect();
        long.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(parse_request(&long, 8192), Err(HttpError::HeadTooLarge));
        assert_eq!(
            parse_request(b"\x16\x03\x01\x02\x00\x01\r\n\r\n", 8192),
            Err(HttpError::Malformed)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.0\r\n\r\n", 8192),
            Err(HttpError::BadVersion)
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend(format!("X-{i}: y\r\n").bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse_request(&many, 1 << 20), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let r = Response::switching_protocols("dGhlIHNhbXBsZSBub25jZQ==");
        let s = String::from_utf8(r.bytes).unwrap();
        assert!(s.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn key_validation() {
        let mut r = Request::default();
        assert!(!r.ws_key_valid());
        r.ws_key = Some("short".into());
        assert!(!r.ws_key_valid());
        r.ws_key = Some("dGhlIHNhbXBsZSBub25jZQ==".into());
        assert!(r.ws_key_valid());
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(percent_decode("%+41"), "% 41", "a sign is not a hex digit");
        assert_eq!(percent_decode("%-1"), "%-1");
    }

    #[test]
    fn forwarded_addresses_in_both_spellings() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.2:8080\r\nX-Forwarded-For: [2001:db8::7]:1\r\n\r\n";
        let (req, _) = parse_request(head.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(
            req.forwarded_for(),
            Some(vec![ip("203.0.113.9"), ip("10.0.0.2"), ip("2001:db8::7")])
        );
        // Forwarded wins over X-Forwarded-For; unknown and obfuscated hops are None.
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\nForwarded: for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\"\r\nForwarded: for=unknown, proto=https, for=_hidden\r\n\r\n";
        let (req, _) = parse_request(head.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(
            req.forwarded_for(),
            Some(vec![
                ip("192.0.2.60"),
                ip("2001:db8:cafe::17"),
                None,
                None,
                None
            ])
        );
        let head = "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        let (req, _) = parse_request(head.as_bytes(), 8192).unwrap().unwrap();
        assert_eq!(req.forwarded_for(), None);
    }
}
