//! Invariant: the channel permission rules give every `owner` and `tenant`
//! channel to exactly one id, whatever the ids and channel names contain
//! (separators, look-alikes, `*`, Unicode). For two identities and a
//! channel taken from the input, under the default rules (`user:` owner,
//! `tenant:` tenant) and with `publish` set to the same rules:
//!
//! * subscribe (which presence, history and recovery check too) and
//!   publish are granted exactly when the channel's id segment (between
//!   the first and the second `:`) equals the whole id and the id follows
//!   the id rule (`switchboard::id::valid_id`: no `:` among others);
//! * two different ids are never both granted one channel;
//! * nothing panics.
//!
//! Input layout: the user id (or tenant) of the first identity, `0xFF`,
//! that of the second, `0xFF`, the channel name (invalid UTF-8 parts end
//! the run: they never reach this layer).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard::auth::Identity;
use switchboard::config::Config;
use switchboard::id::valid_id;
use switchboard::policy::{Action, allowed};

fn configs() -> &'static [Config; 2] {
    static C: OnceLock<[Config; 2]> = OnceLock::new();
    C.get_or_init(|| {
        let subscribe = Config::default();
        let mut publish = Config::default();
        for rules in publish.channels.namespaces.values_mut() {
            rules.publish = rules.subscribe;
        }
        [subscribe, publish]
    })
}

fn who(ns: &str, id: &str) -> Identity {
    if ns == "tenant" {
        Identity {
            tenant: Some(id.to_owned()),
            ..Identity::user("someone")
        }
    } else {
        Identity::user(id)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xFF).map(std::str::from_utf8);
    let (Some(Ok(u)), Some(Ok(v)), Some(Ok(rest))) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    for ns in ["user", "tenant"] {
        // The channel as given, and the channel built from the ids (the
        // attack: `user:alice:bob` for `alice` and `alice:bob`).
        for channel in [
            format!("{ns}:{rest}"),
            format!("{ns}:{u}"),
            format!("{ns}:{v}"),
            format!("{ns}:{u}:{rest}"),
        ] {
            let segment = channel
                .split_once(':')
                .map_or("", |(_, r)| r.split(':').next().unwrap_or(""));
            for (cfg, action) in [
                (&configs()[0], Action::Subscribe),
                (&configs()[1], Action::Publish),
            ] {
                let granted = |id: &str| allowed(cfg, action, &channel, &who(ns, id));
                for id in [u, v] {
                    assert_eq!(
                        granted(id),
                        valid_id(id) && segment == id,
                        "{action:?} {id:?} on {channel:?}"
                    );
                }
                if u != v {
                    assert!(
                        !(granted(u) && granted(v)),
                        "{u:?} and {v:?} both get {channel:?}"
                    );
                }
            }
        }
    }
});
