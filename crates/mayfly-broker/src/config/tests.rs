//! Parsing and checking `mayfly.toml`.

use std::time::Duration;

use super::*;

const MINIMAL: &str = r#"
    trust_domain = "example.org"
    data_dir = "data"
    [listen]
    grpc = "127.0.0.1:1"
    http = "127.0.0.1:2"
    [tls]
    cert = "c.pem"
    key = "/abs/k.pem"
    trust_bundle = "b.pem"
    [policy]
    dir = "policies"
"#;

#[test]
fn defaults_and_relative_paths() {
    let c = Config::parse(MINIMAL, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.data_dir, Path::new("/etc/mayfly/data"));
    assert_eq!(c.policy.dir, Path::new("/etc/mayfly/policies"));
    assert_eq!(c.tls.key, Path::new("/abs/k.pem"));
    assert_eq!(c.tokens.default_ttl, Duration::from_secs(300));
    assert_eq!(c.tokens.max_ttl, Duration::from_secs(900));
    assert_eq!(c.tasks.max_ttl, Duration::from_secs(8 * 3600));
    assert_eq!(c.store, StoreKind::Embedded);
    assert_eq!(c.issuer(), "https://127.0.0.1:2");
}

#[test]
fn a_redis_password_never_shows_in_debug() {
    let r = RedisConfig {
        url: Some("redis://:hunter2@db:6379/0".into()),
        sentinels: vec!["redis://u:hunter3@s1:26379".into()],
        ..Default::default()
    };
    let shown = format!(
        "{r:?} {:?}",
        StoreKind::RedisUrl("redis://:hunter4@db:1".into())
    );
    assert!(!shown.contains("hunter"), "{shown}");
    assert!(
        shown.contains("redis://db:6379/0") && shown.contains("s1:26379"),
        "{shown}"
    );
}

#[test]
fn the_audit_trail_follows_the_store_unless_told() {
    let base = Path::new("/etc/mayfly");
    let c = Config::parse(MINIMAL, base).unwrap();
    assert_eq!(c.audit_sink(), AuditSinkKind::File);
    assert_eq!(c.audit_path(), Path::new("/etc/mayfly/data/audit.jsonl"));
    let redis = format!("store = \"redis://127.0.0.1:6379\"\n{MINIMAL}");
    assert_eq!(
        Config::parse(&redis, base).unwrap().audit_sink(),
        AuditSinkKind::Redis
    );
    let own_file = format!("{MINIMAL}\n[audit]\nsink = \"file\"\npath = \"a.jsonl\"");
    let c = Config::parse(&own_file, base).unwrap();
    assert_eq!(c.audit_sink(), AuditSinkKind::File);
    assert_eq!(c.audit_path(), Path::new("/etc/mayfly/a.jsonl"));
    let sized =
        format!("{own_file}\nrotate_size = \"8MiB\"\nrotate_age = \"1h\"\nretention = \"30d\"");
    let o = Config::parse(&sized, base).unwrap().audit_file_options();
    assert_eq!(o.rotate_bytes, 8 << 20);
    assert_eq!(o.rotate_age, Duration::from_secs(3600));
    assert_eq!(o.retention, Some(Duration::from_secs(30 * 86_400)));
    for (extra, says) in [
        ("sink = \"redis\"", "needs store = \"redis\""),
        (
            "sink = \"stdout\"\npath = \"a\"",
            "only for sink = \"file\"",
        ),
        ("sink = \"syslog\"", "syslog"),
        ("rotate_size = \"1KiB\"", "at least 4KiB"),
        ("rotate_size = \"lots\"", "KiB, MiB or GiB"),
        ("retention = \"5m\"", "at least 1h"),
    ] {
        let text = format!("{MINIMAL}\n[audit]\n{extra}");
        let e = Config::parse(&text, base).unwrap_err().to_string();
        assert!(e.contains(says), "{extra}: {e}");
    }
}

#[test]
fn rejects_bad_values_with_a_reason() {
    let unknown = format!("{MINIMAL}\nbogus = 1");
    let e = Config::parse(&unknown, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bogus"), "{e}");
    let bad_ttl = MINIMAL.replace("[tls]", "[tokens]\ndefault_ttl = \"1h\"\n[tls]");
    let e = Config::parse(&bad_ttl, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("default_ttl <= max_ttl"), "{e}");
    let stretchable = MINIMAL.replace(
        "[tls]",
        "[ssf]\npush_endpoints = [\"https://siem.example\"]\n[tls]",
    );
    let e = Config::parse(&stretchable, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ssf.push_endpoints"), "{e}");
    let bad_duration = MINIMAL.replace("[tls]", "[tokens]\nmax_ttl = \"soon\"\n[tls]");
    let e = Config::parse(&bad_duration, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"soon\""), "{e}");
    let sub_second = MINIMAL.replace("[tls]", "[tokens]\nmax_ttl = \"1500ms\"\n[tls]");
    let e = Config::parse(&sub_second, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokens.max_ttl must be a whole number of seconds"),
        "{e}"
    );
    let bad_store = format!("store = \"mongodb\"\n{MINIMAL}");
    let e = Config::parse(&bad_store, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown store"), "{e}");
    let bad_intro = format!(
        "{MINIMAL}\n[[introspection]]\nclients = [\"spiffe://example.org/a/*\"]\naudiences = [\"a*b\"]"
    );
    let e = Config::parse(&bad_intro, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only at the end"), "{e}");
    for (tokens, want) in [
        (
            "rotate_every = \"1d\"\nrotate_lead = \"5s\"",
            "rotate_lead must be longer than tokens.key_reload_interval",
        ),
        (
            "rotate_every = \"5m\"\nrotate_lead = \"10m\"",
            "rotate_every must be longer than tokens.rotate_lead",
        ),
    ] {
        let text = MINIMAL.replace("[tls]", &format!("[tokens]\n{tokens}\n[tls]"));
        let e = Config::parse(&text, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    let rotating = MINIMAL.replace("[tls]", "[tokens]\nrotate_every = \"7d\"\n[tls]");
    let s = Config::parse(&rotating, Path::new("."))
        .unwrap()
        .settings()
        .unwrap();
    assert_eq!(
        s.key_rotation,
        Some(crate::config::KeyRotation {
            every: std::time::Duration::from_secs(7 * 86400),
            lead: std::time::Duration::from_secs(600),
        })
    );
    let no_policy = MINIMAL.replace("[policy]\n    dir = \"policies\"", "");
    let e = Config::parse(&no_policy, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("policy"), "{e}");
}

#[test]
fn connection_bounds_must_keep_room_for_authenticated_callers() {
    let c = Config::parse(MINIMAL, Path::new(".")).unwrap();
    assert_eq!(c.connections.max, 4096);
    assert_eq!(c.connections.idle_timeout, Duration::from_secs(300));
    let ok = format!(
        "{MINIMAL}\n[connections]\nmax = 100\nmax_unauthenticated = 10\nmax_unauthenticated_per_source = 2\nidle_timeout = \"1m\""
    );
    let c = Config::parse(&ok, Path::new(".")).unwrap();
    assert_eq!(c.connections.max_unauthenticated_per_source, 2);
    assert_eq!(c.connections.ipv6_source_prefix, 64);
    let c = Config::parse(
        &format!("{MINIMAL}\n[connections]\nipv6_source_prefix = 56"),
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.connections.ipv6_source_prefix, 56);
    for bad in [
        "ipv6_source_prefix = 0",
        "ipv6_source_prefix = 129",
        "max = 10\nmax_unauthenticated = 10",
        "max_unauthenticated_per_source = 0",
        "max_unauthenticated = 10\nmax_unauthenticated_per_source = 11",
        "idle_timeout = \"0s\"",
    ] {
        let text = format!("{MINIMAL}\n[connections]\n{bad}");
        let e = Config::parse(&text, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("connections:"), "{bad}: {e}");
    }
}

#[test]
fn redis_store_settings() {
    let redis = MINIMAL.replace(
        "[listen]",
        "store = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n[listen]",
    );
    let c = Config::parse(&redis, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.store, StoreKind::Redis);
    assert_eq!(c.redis.unwrap().key_prefix, "mayfly");
    let short = format!("store = \"rediss://u:secret@r.example:6380/0\"\n{MINIMAL}");
    let c = Config::parse(&short, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.store, StoreKind::Redis);
    let r = c.redis.unwrap();
    assert_eq!(r.url.as_deref(), Some("rediss://u:secret@r.example:6380/0"));
    assert_eq!(r.key_prefix, "mayfly");
    let both = format!(
        "store = \"redis://a:1\"\n{}",
        MINIMAL.replace("[listen]", "[redis]\nurl = \"redis://b:2\"\n[listen]")
    );
    let e = Config::parse(&both, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("give one"), "{e}");
    let sentinel = MINIMAL.replace(
        "[listen]",
        "store = \"redis\"\n[redis]\nsentinels = [\"redis://10.0.0.1:26379\"]\nmaster_name = \"m\"\npassword_file = \"pw\"\n[listen]",
    );
    let c = Config::parse(&sentinel, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(
        c.redis.unwrap().password_file.unwrap(),
        Path::new("/etc/mayfly/pw")
    );
    for (bad, want) in [
        ("store = \"redis\"\n", "needs a [redis] section"),
        ("store = \"redis\"\n[redis]\n", "exactly one of"),
        (
            "store = \"redis\"\n[redis]\nsentinels = [\"redis://h:1\"]\n",
            "master_name",
        ),
        (
            "store = \"redis\"\n[redis]\nurl = \"http://h\"\n",
            "must start with redis://",
        ),
        ("[redis]\nurl = \"redis://h\"\n", "needs store = \"redis\""),
        (
            "store = \"redis\"\n[redis]\nsentinels = [\"rediss://a:1\", \"redis://b:1\"]\nmaster_name = \"m\"\n",
            "all redis:// or all rediss://",
        ),
        (
            "store = \"redis\"\n[redis]\nsentinels = [\"tcp://a:1\"]\nmaster_name = \"m\"\n",
            "sentinels must start with",
        ),
    ] {
        let text = MINIMAL.replace("[listen]", &format!("{bad}[listen]"));
        let e = Config::parse(&text, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn kubernetes_configmap_parses() {
    let yaml = include_str!("../../../../deploy/kubernetes/configmap.yaml");
    let toml: String = yaml
        .lines()
        .skip_while(|l| !l.contains("mayfly.toml: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let c = Config::parse(&toml, Path::new("/etc/mayfly/config")).unwrap();
    assert_eq!(c.store, StoreKind::Redis);
    assert_eq!(c.audit_sink(), AuditSinkKind::Redis);
    assert_eq!(c.listen.health, Some("0.0.0.0:8712".parse().unwrap()));
    let redis = c.redis.unwrap();
    assert_eq!(redis.sentinels.len(), 3);
    assert!(redis.sentinels.iter().all(|s| s.starts_with("rediss://")));
    assert_eq!(redis.master_name.as_deref(), Some("mayfly"));
    assert_eq!(redis.ca.unwrap(), Path::new("/etc/mayfly/redis/ca.pem"));
    assert_eq!(redis.replicas_to_ack, 1);
    assert!(c.ca.is_some(), "the issuing CA is configured");
    assert_eq!(c.introspection.len(), 1);
    assert_eq!(c.gateways.len(), 1);
}

#[test]
fn shipped_example_parses() {
    let text = include_str!("../../../../deploy/mayfly.example.toml");
    let c = Config::parse(text, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(c.issuer(), "https://mayfly.prod.example.com:8711");
    assert_eq!(c.policy.dir, Path::new("/etc/mayfly/policies"));
    assert_eq!(c.audit_path(), Path::new("/var/lib/mayfly/audit.jsonl"));
}

#[test]
fn dev_config_parses() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let layout = crate::dev::init(&dir.path().join("dev"), &td).unwrap();
    let c = Config::load(&layout.config).unwrap();
    assert!(c.policy.dir.join("mayfly.cedar").exists());
    mayfly_policy::CedarPolicy::load_dir(&c.policy.dir).expect("dev policies validate");
    assert_eq!(c.issuer(), "https://localhost:8711");
    assert!(
        crate::dev::init(&dir.path().join("dev"), &td).is_err(),
        "refuses to overwrite"
    );
}

/// Each store and trail the file can name resolves to the one settings
/// variant that says it; a combination no broker can be built from is
/// refused by the same checks when a loaded `Config` is changed later.
#[test]
fn settings_resolve_each_store_and_trail() {
    let base = Path::new("/etc/mayfly");
    let s = Config::parse(MINIMAL, base).unwrap().settings().unwrap();
    assert_eq!(s.broker_id.as_str(), "spiffe://example.org/mayfly/broker");
    assert_eq!(s.issuer, "https://127.0.0.1:2");
    match s.store {
        StoreSettings::Embedded {
            path,
            trail: Trail::File { path: trail, .. },
        } => {
            assert_eq!(path, Path::new("/etc/mayfly/data/leases.redb"));
            assert_eq!(trail, Path::new("/etc/mayfly/data/audit.jsonl"));
        }
        other => panic!("{other:?}"),
    }

    let redis = format!("store = \"redis://:hunter2@db:6379/0\"\n{MINIMAL}");
    let s = Config::parse(&redis, base).unwrap().settings().unwrap();
    let StoreSettings::Redis { redis: r, trail } = &s.store else {
        panic!("{:?}", s.store)
    };
    assert!(matches!(trail, RedisTrail::Stream { retention: None }));
    assert!(matches!(&r.endpoint, RedisEndpoint::Url(u) if u.contains("hunter2")));
    let shown = format!("{s:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("redis://db:6379/0"), "{shown}");

    // A file trail beside Redis is refused: the two cannot be written
    // together.
    let own_file = format!("{redis}\n[audit]\nsink = \"file\"");
    let e = Config::parse(&own_file, base).unwrap_err().to_string();
    assert!(
        e.contains("sink = \"file\" cannot be used with store = \"redis\"")
            && e.contains("Use sink = \"redis\""),
        "{e}"
    );

    let stdout = format!("{redis}\n[audit]\nsink = \"stdout\"");
    let s = Config::parse(&stdout, base).unwrap().settings().unwrap();
    assert!(matches!(
        s.store,
        StoreSettings::Redis {
            trail: RedisTrail::Outside(Trail::Stdout),
            ..
        }
    ));

    let file = MINIMAL.replace(
        "[listen]",
        "store = \"redis\"\n[redis]\nurl_file = \"secrets/url\"\n[listen]",
    );
    let s = Config::parse(&file, base).unwrap().settings().unwrap();
    assert!(matches!(
        s.store,
        StoreSettings::Redis { redis: RedisSettings { endpoint: RedisEndpoint::UrlFile(ref p), .. }, .. }
            if p == Path::new("/etc/mayfly/secrets/url")
    ));

    // Changed after loading (as tests and embedders do): checked again.
    let mut c = Config::parse(MINIMAL, base).unwrap();
    c.audit.sink = Some(AuditSinkKind::Redis);
    let e = c.settings().unwrap_err().to_string();
    assert!(e.contains("needs store = \"redis\""), "{e}");
    c.audit.sink = None;
    c.tasks.default_ttl = Duration::from_secs(9 * 3600);
    let e = c.settings().unwrap_err().to_string();
    assert!(e.contains("tasks: need"), "{e}");
}

#[test]
fn tls_comes_from_three_files_or_the_workload_api_never_both() {
    let api = MINIMAL.replace(
        "cert = \"c.pem\"\n    key = \"/abs/k.pem\"\n    trust_bundle = \"b.pem\"",
        "workload_api = \"unix:///run/spire/agent.sock\"",
    );
    let c = Config::parse(&api, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(
        c.tls.workload_api.as_deref(),
        Some("unix:///run/spire/agent.sock")
    );
    // Unset paths stay unset rather than becoming the config's directory.
    assert!(c.tls.cert.as_os_str().is_empty());
    let both = MINIMAL.replace(
        "trust_bundle = \"b.pem\"",
        "trust_bundle = \"b.pem\"\n    workload_api = \"unix:///run/spire/agent.sock\"",
    );
    let e = Config::parse(&both, Path::new("/etc/mayfly")).unwrap_err();
    assert!(
        e.to_string().contains("remove cert, key and trust_bundle"),
        "{e}"
    );
    let half = MINIMAL.replace("    trust_bundle = \"b.pem\"\n", "");
    let e = Config::parse(&half, Path::new("/etc/mayfly")).unwrap_err();
    assert!(
        e.to_string()
            .contains("needs cert, key and trust_bundle, or workload_api"),
        "{e}"
    );
}

#[test]
fn federated_bundles_name_other_trust_domains_once() {
    let one = format!(
        "{MINIMAL}\n    [[tls.federated]]\n    trust_domain = \"partner.example\"\n    bundle = \"partner.pem\"\n"
    );
    let c = Config::parse(&one, Path::new("/etc/mayfly")).unwrap();
    assert_eq!(
        c.tls.federated[0].bundle,
        Path::new("/etc/mayfly/partner.pem")
    );
    let own = one.replace("partner.example", "example.org");
    let e = Config::parse(&own, Path::new("/etc/mayfly")).unwrap_err();
    assert!(e.to_string().contains("twice, or the broker's own"), "{e}");
    let twice = format!(
        "{one}\n    [[tls.federated]]\n    trust_domain = \"partner.example\"\n    bundle = \"p2.pem\"\n"
    );
    assert!(Config::parse(&twice, Path::new("/etc/mayfly")).is_err());
    // Without a file, the bundle can only come from the Workload API.
    let no_file = one.replace("    bundle = \"partner.pem\"\n", "");
    let e = Config::parse(&no_file, Path::new("/etc/mayfly")).unwrap_err();
    assert!(e.to_string().contains("has no bundle"), "{e}");
    let from_api = no_file
        .replace("    cert = \"c.pem\"\n", "")
        .replace("    key = \"/abs/k.pem\"\n", "")
        .replace(
            "    trust_bundle = \"b.pem\"\n",
            "    workload_api = \"unix:///run/spire/agent.sock\"\n",
        );
    let c = Config::parse(&from_api, Path::new("/etc/mayfly")).unwrap();
    assert!(c.tls.federated[0].bundle.as_os_str().is_empty());
}

#[test]
fn a_jwt_bundle_from_the_workload_api_needs_one() {
    let text = format!("{MINIMAL}\n[[federation]]\nworkload_api = true\n");
    let err = Config::parse(&text, Path::new("/etc/mayfly"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("set [tls] workload_api"), "{err}");
}

#[test]
fn resource_servers_are_named_once_and_find_a_token_s_recipient() {
    let base = Path::new("/etc/mayfly");
    let entry = |name: &str, clients: &str, audiences: &str| {
        format!(
            "{MINIMAL}\n[[resource_servers]]\nname = \"{name}\"\nclients = [{clients}]\n\
             audiences = [{audiences}]\n"
        )
    };
    let good = format!(
        "{}\n[[resource_servers]]\nname = \"tools\"\n\
         clients = [\"spiffe://example.org/api/tools\"]\n\
         audiences = [\"https://tools.example.com\"]\n",
        entry(
            "api",
            "\"spiffe://example.org/api/*\"",
            "\"https://api.example.com\""
        )
    );
    let s = Config::parse(&good, base).unwrap().settings().unwrap();
    let id = |s: &str| mayfly_core::SpiffeId::new(s).unwrap();
    let find = |caller: &str, aud: &str| {
        ResourceServer::find(&s.resource_servers, &id(caller), aud).map(|r| r.name.as_str())
    };
    assert_eq!(
        find("spiffe://example.org/api/files", "https://api.example.com"),
        Some("api")
    );
    assert_eq!(
        find(
            "spiffe://example.org/api/tools",
            "https://tools.example.com"
        ),
        Some("tools")
    );
    // A resource server of one audience is no recipient of another's
    // tokens, and an agent of none.
    assert_eq!(
        find(
            "spiffe://example.org/api/files",
            "https://tools.example.com"
        ),
        None
    );
    assert_eq!(
        find("spiffe://example.org/agent/demo", "https://api.example.com"),
        None
    );
    // Each may introspect its own audience's tokens.
    assert!(s.introspection.iter().any(|g| {
        g.clients
            .iter()
            .any(|p| p.matches(&id("spiffe://example.org/api/tools")))
            && g.audiences
                .iter()
                .any(|a| a.matches("https://tools.example.com"))
    }));

    for (text, needle) in [
        (
            format!(
                "{}\n[[resource_servers]]\nname = \"api\"\nclients = [\"spiffe://example.org/x\"]\naudiences = [\"https://x\"]\n",
                entry(
                    "api",
                    "\"spiffe://example.org/api/*\"",
                    "\"https://api.example.com\""
                )
            ),
            "named twice",
        ),
        (
            entry("", "\"spiffe://example.org/api/*\"", "\"https://a\""),
            "a name is",
        ),
        (
            entry(
                "bad name",
                "\"spiffe://example.org/api/*\"",
                "\"https://a\"",
            ),
            "a name is",
        ),
        (
            entry("api", "", "\"https://a\""),
            "needs clients and audiences",
        ),
        (
            entry("api", "\"spiffe://example.org/api/*\"", ""),
            "needs clients and audiences",
        ),
    ] {
        let err = Config::parse(&text, base)
            .and_then(|c| c.settings().map(|_| ()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[test]
fn a_database_may_shorten_its_logins_lifetimes() {
    let base = Path::new("/etc/mayfly");
    let with = |lines: &str| {
        let text = format!(
            "{MINIMAL}\n[[databases]]\nname = \"postgres://orders\"\n\
             url = \"postgres://manager@127.0.0.1:5432/orders\"\n{lines}\n\
             [databases.scopes]\n\"db:read\" = [\"GRANT r TO {{role}}\"]\n"
        );
        Config::parse(&text, base).and_then(|c| c.settings())
    };
    let minutes = |m: u64| Duration::from_secs(m * 60);
    // The tokens' lifetimes (5m, 15m) where the entry sets none; a
    // maximum under the tokens' default lowers the default too.
    let l = with("").unwrap().lifetimes;
    assert_eq!(l.database("postgres://orders"), (minutes(5), minutes(15)));
    let l = with("max_ttl = \"2m\"").unwrap().lifetimes;
    assert_eq!(l.database("postgres://orders"), (minutes(2), minutes(2)));
    let l = with("default_ttl = \"1m\"\nmax_ttl = \"1h\"")
        .unwrap()
        .lifetimes;
    assert_eq!(l.database("postgres://orders"), (minutes(1), minutes(60)));
    // A default beyond the maximum it falls back to is refused.
    let e = with("default_ttl = \"20m\"").unwrap_err().to_string();
    assert!(e.contains("default_ttl is longer than max_ttl"), "{e}");
}

#[test]
fn a_config_named_by_a_relative_path_finds_its_files() {
    // A directory under the working directory, named relatively, as in
    // `mayfly serve --config prof/mayfly.toml`.
    let dir = tempfile::tempdir_in(".").unwrap();
    let relative = Path::new(dir.path().file_name().unwrap());
    std::fs::write(dir.path().join("manager.pw"), "pw\n").unwrap();
    std::fs::write(
        dir.path().join("mayfly.toml"),
        format!(
            "{MINIMAL}\n[[databases]]\nname = \"postgres://orders\"\n\
             url = \"postgres://manager@127.0.0.1:5432/orders\"\n\
             password_file = \"manager.pw\"\n\
             [databases.scopes]\n\"db:read\" = [\"GRANT r TO {{role}}\"]\n"
        ),
    )
    .unwrap();
    // Loading reads the manager's password: from the file's directory.
    let c = Config::load(&relative.join("mayfly.toml")).unwrap();
    let pw = c.databases[0].password_file.as_ref().unwrap();
    assert_eq!(pw, &relative.join("manager.pw"));
    std::fs::remove_file(dir.path().join("manager.pw")).unwrap();
    let e = Config::load(&relative.join("mayfly.toml")).unwrap_err();
    assert!(e.to_string().contains("manager.pw"), "{e}");
}
