//! Invariant: `switchboard::http::parse_request` never panics on any bytes, and
//! the request-head parser is split-invariant. For each `max_head` tried:
//!
//! * `Ok(Some((req, n)))` implies `n <= input.len()` and `n <= max_head`;
//! * `Ok(None)` ("read more") implies `input.len() < max_head`;
//! * the head alone, `input[..n]`, parses to the same request and length, so
//!   bytes after the head (a pipelined first frame) never change the result;
//! * every prefix shorter than `n` parses as `Ok(None)`: a request that arrives
//!   in pieces is neither completed early (a `Complete` of another length) nor
//!   refused (an error) before its last byte. This is stricter than "Ok(None)
//!   or an error": since a prefix is shorter than `n <= max_head` and holds no
//!   more headers than the whole, no error is legitimate there either.
//!
//! On a parsed request it also calls `query_param`, `ws_key_valid` and
//! `wants_upgrade` (which must not panic) and checks what they promise.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::http::parse_request;

/// Small enough that the fuzzer hits `HeadTooLarge`, and the server's default.
const MAX_HEADS: [usize; 3] = [64, 1024, 8192];

/// Prefixes checked exhaustively below this head length; sampled above it so
/// one execution stays fast.
const EXHAUSTIVE: usize = 512;

fuzz_target!(|data: &[u8]| {
    for max_head in MAX_HEADS {
        let whole = parse_request(data, max_head);
        match &whole {
            Ok(None) => assert!(
                data.len() < max_head,
                "Ok(None) with {} bytes >= max_head {max_head}",
                data.len()
            ),
            Err(_) => {}
            Ok(Some((req, n))) => {
                let n = *n;
                assert!(n <= data.len(), "used {n} > input {}", data.len());
                assert!(n <= max_head, "used {n} > max_head {max_head}");
                check_request(req);

                // Trailing bytes do not matter.
                let head_only = parse_request(&data[..n], max_head);
                assert_eq!(head_only, whole, "head alone parses differently");

                // Every shorter prefix is "need more".
                for cut in prefixes(n) {
                    let r = parse_request(&data[..cut], max_head);
                    assert_eq!(
                        r,
                        Ok(None),
                        "prefix of {cut} bytes (whole head is {n}, max_head {max_head})"
                    );
                }
            }
        }
    }
});

/// Prefix lengths to check for a head of `n` bytes: all of them for a short
/// head; otherwise the first and last 64 (where the request line and the
/// final CRLFs are) plus about 64 evenly spaced in between.
fn prefixes(n: usize) -> Box<dyn Iterator<Item = usize>> {
    if n <= EXHAUSTIVE {
        Box::new(0..n)
    } else {
        let step = (n / 64).max(1);
        Box::new((0..64).chain((64..n - 64).step_by(step)).chain(n - 64..n))
    }
}

fn check_request(req: &switchboard::http::Request) {
    assert_eq!(
        req.wants_upgrade(),
        req.upgrade_websocket && req.connection_upgrade
    );
    if req.ws_key_valid() {
        let k = req.ws_key.as_deref().expect("a valid key exists");
        assert_eq!(k.len(), 24);
        assert!(k.ends_with("=="));
    }
    assert!(
        !req.path.contains('?'),
        "path keeps its query: {:?}",
        req.path
    );
    // Look up a fixed name, and every name that actually occurs in the query
    // (percent-decoding must be total on any value).
    let _ = req.query_param("token");
    let _ = req.query_param("");
    if let Some(q) = req.query.as_deref() {
        for pair in q.split('&') {
            let name = pair.split_once('=').map_or(pair, |(k, _)| k);
            assert!(
                req.query_param(name).is_some(),
                "query name {name:?} present but not found"
            );
        }
    }
}
