//! The web console served at `/`: one page (HTML, JS, CSS) embedded in the
//! binary, with no build step and no external resource, so it works offline.
//! It speaks the JSON protocol on `/ws` and the HTTP API (`/api/*`) of the
//! server that serves it (or another one named in its URL field).

const INDEX_HTML: &[u8] = include_bytes!("console/index.html");
const CONSOLE_JS: &[u8] = include_bytes!("console/console.js");
const CONSOLE_CSS: &[u8] = include_bytes!("console/console.css");

/// The console file at `path` (a query string is ignored):
/// `(content type with charset, body)`, or `None` for any other path.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX_HTML)),
        "/console.js" => Some(("text/javascript; charset=utf-8", CONSOLE_JS)),
        "/console.css" => Some(("text/css; charset=utf-8", CONSOLE_CSS)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::asset;

    fn text(path: &str) -> &'static str {
        std::str::from_utf8(asset(path).expect(path).1).expect("UTF-8")
    }

    #[test]
    fn serves_the_three_files_and_nothing_else() {
        assert_eq!(asset("/").unwrap().0, "text/html; charset=utf-8");
        assert_eq!(asset("/index.html"), asset("/"));
        assert_eq!(asset("/?x=1"), asset("/"));
        assert_eq!(
            asset("/console.js").unwrap().0,
            "text/javascript; charset=utf-8"
        );
        assert_eq!(asset("/console.css").unwrap().0, "text/css; charset=utf-8");
        for other in [
            "",
            "/ws",
            "/console",
            "/../Cargo.toml",
            "/index.htm",
            "/console.js/",
        ] {
            assert_eq!(asset(other), None, "{other}");
        }
    }

    #[test]
    fn the_page_loads_its_own_files_only() {
        let html = text("/");
        assert!(html.contains(r#"src="console.js""#));
        assert!(html.contains(r#"href="console.css""#));
        for file in ["/", "/console.css"] {
            let t = text(file);
            for external in ["://", "@import", "url("] {
                assert!(!t.contains(external), "{file} refers to {external}");
            }
        }
        let js = text("/console.js");
        for external in ["import ", "import(", "importScripts", "'//", "\"//"] {
            assert!(!js.contains(external), "console.js loads code: {external}");
        }
    }

    #[test]
    fn the_page_has_the_ids_the_tests_use() {
        let html = text("/");
        for id in [
            "url",
            "token",
            "userId",
            "apiKey",
            "connect",
            "disconnect",
            "state",
            "channel",
            "subscribe",
            "unsubscribe",
            "pubChannel",
            "pubData",
            "publishWs",
            "publishApi",
            "sendTo",
            "sendData",
            "sendWs",
            "sendApi",
            "log",
            "status",
        ] {
            assert!(html.contains(&format!(r#"id="{id}""#)), "#{id} missing");
        }
    }

    #[test]
    fn the_script_never_writes_html() {
        let js = text("/console.js");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
        ] {
            assert!(!js.contains(sink), "console.js uses {sink}");
        }
    }
}
