//! The shipped example policies and the loader's error reports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mayfly_core::{
    Action, Audience, Binding, Decision, Envelope, Intent, Policy, PolicyRequest, Proof, SpiffeId,
    Task, TaskContext, TaskFacts, TaskId, Timestamp, parse_scopes,
};
use mayfly_policy::CedarPolicy;

const TICKETS: &str = "https://tickets.prod.example.com";
const PAYMENTS: &str = "https://payments.prod.example.com";

fn shipped() -> CedarPolicy {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
    CedarPolicy::load_dir(&dir).unwrap()
}

fn agent() -> SpiffeId {
    SpiffeId::new("spiffe://prod.example.com/agents/support/triage").unwrap()
}

fn task(context: &[(&str, &str)]) -> Task {
    Task {
        id: TaskId::generate(),
        agent: agent(),
        intent: Intent::new("triage the queue").unwrap(),
        context: TaskContext::new(context.iter().copied()).unwrap(),
        envelope: Envelope::new(&[TICKETS, PAYMENTS], &["read:tickets", "write:tickets"]).unwrap(),
        created_at: Timestamp::now(),
        expires_at: Timestamp::now().plus(Duration::from_secs(3600)),
        revision: 0,
        parent: None,
        delegated_by: Vec::new(),
        authenticated_by: Proof::Certificate,
    }
}

fn token(p: &CedarPolicy, task: &Task, audience: &str, scopes: &[&str]) -> Decision {
    p.decide(&PolicyRequest {
        principal: &task.agent,
        proof: &Proof::Certificate,
        action: Action::IssueToken {
            audience: &Audience::new(audience).unwrap(),
            scopes: &parse_scopes(scopes).unwrap(),
            binding: &Binding::Bearer,
        },
        task: TaskFacts::of(task),
        ttl: Duration::from_secs(900),
        now: Timestamp::now(),
    })
}

fn permit(d: Decision) -> (String, Option<Duration>, bool) {
    match d {
        Decision::Permit {
            policy_id,
            max_ttl,
            approval_required,
        } => (policy_id, max_ttl, approval_required),
        other => panic!("expected a permit, got {other:?}"),
    }
}

fn deny(d: Decision) -> (Option<String>, String) {
    match d {
        Decision::Deny { policy_id, reason } => (policy_id, reason),
        other => panic!("expected a deny, got {other:?}"),
    }
}

#[test]
fn reads_are_automatic_and_capped() {
    let p = shipped();
    let t = task(&[("environment", "production")]);
    let (id, ttl, approval) = permit(token(&p, &t, TICKETS, &["read:tickets"]));
    assert_eq!(id, "read-scopes-automatic");
    assert_eq!(ttl, Some(Duration::from_secs(900)));
    assert!(!approval);
    // Two permits apply to payments reads: the shorter cap wins.
    let (id, ttl, _) = permit(token(&p, &t, PAYMENTS, &["read:payments"]));
    assert_eq!(id, "payments-short-lived,read-scopes-automatic");
    assert_eq!(ttl, Some(Duration::from_secs(120)));
}

#[test]
fn writes_need_approval_in_production_only() {
    let p = shipped();
    let staging = task(&[("environment", "staging")]);
    let (id, ttl, approval) = permit(token(
        &p,
        &staging,
        TICKETS,
        &["read:tickets", "write:tickets"],
    ));
    assert_eq!(
        (id.as_str(), ttl, approval),
        (
            "write-scopes-outside-production",
            Some(Duration::from_secs(600)),
            false
        )
    );
    let prod = task(&[("environment", "production")]);
    let (id, ttl, approval) = permit(token(&p, &prod, TICKETS, &["write:tickets"]));
    assert_eq!(id, "write-scopes-in-production-need-approval");
    assert_eq!(ttl, Some(Duration::from_secs(300)));
    assert!(approval);
    // No context at all is "not production".
    assert!(!permit(token(&p, &task(&[]), TICKETS, &["write:tickets"])).2);
}

#[test]
fn restricted_data_cannot_be_exported_and_nothing_else_is_allowed_by_default() {
    let p = shipped();
    let restricted = task(&[("data_sensitivity", "restricted")]);
    let (id, reason) = deny(token(&p, &restricted, TICKETS, &["export:tickets"]));
    assert_eq!(id.as_deref(), Some("no-export-of-restricted-data"));
    assert!(
        !reason.contains("getTag"),
        "never the policy text: {reason}"
    );
    let open = task(&[("data_sensitivity", "public")]);
    let (id, reason) = deny(token(&p, &open, TICKETS, &["export:tickets"]));
    assert_eq!(id, None, "default deny");
    assert_eq!(
        reason,
        format!("no policy permits {} to issue_token {TICKETS}", agent())
    );
    let mut t = task(&[]);
    t.agent = SpiffeId::new("spiffe://prod.example.com/humans/eve").unwrap();
    assert!(matches!(
        token(&p, &t, TICKETS, &["read:tickets"]),
        Decision::Deny {
            policy_id: None,
            ..
        }
    ));
    // Envelopes: every audience must be allowed; the forbid applies at start.
    let start = |ctx: &TaskContext, auds: &[&str], scopes: &[&str]| {
        p.decide(&PolicyRequest {
            principal: &agent(),
            proof: &Proof::Certificate,
            action: Action::StartTask {
                envelope: &Envelope::new(auds, scopes).unwrap(),
            },
            task: TaskFacts::new(&Intent::new("x").unwrap(), ctx),
            ttl: Duration::from_secs(3600),
            now: Timestamp::now(),
        })
    };
    let (id, ttl, _) = permit(start(
        &TaskContext::default(),
        &[TICKETS, PAYMENTS],
        &["read:x"],
    ));
    assert_eq!(
        (id.as_str(), ttl),
        ("agents-open-tasks", Some(Duration::from_secs(8 * 3600)))
    );
    assert!(matches!(
        start(
            &TaskContext::default(),
            &[TICKETS, "https://evil.example.com"],
            &[]
        ),
        Decision::Deny { .. }
    ));
    let restricted_ctx = TaskContext::new([("data_sensitivity", "restricted")]).unwrap();
    let (id, _) = deny(start(&restricted_ctx, &[TICKETS], &["export:all"]));
    assert_eq!(id.as_deref(), Some("no-export-of-restricted-data"));
    let cert = p.decide(&PolicyRequest {
        principal: &agent(),
        proof: &Proof::Certificate,
        action: Action::SignCertificate,
        task: TaskFacts::of(&task(&[])),
        ttl: Duration::from_secs(7200),
        now: Timestamp::now(),
    });
    assert_eq!(permit(cert).1, Some(Duration::from_secs(3600)));
}

fn load(text: &str) -> Vec<String> {
    let sources = vec![("p.cedar".to_owned(), text.to_owned())];
    match CedarPolicy::from_sources(&sources, "test") {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn problems_name_file_line_and_column() {
    let parse = load("@id(\"a\")\npermit(principal, action, resource)\nwhen { context.now == };\n");
    assert_eq!(parse.len(), 1, "{parse:?}");
    assert!(parse[0].starts_with("p.cedar:3:"), "{parse:?}");

    let unknown_attr =
        load("@id(\"a\")\npermit(principal, action, resource)\nwhen { context.nope == 1 };\n");
    assert_eq!(unknown_attr.len(), 1, "{unknown_attr:?}");
    assert!(
        unknown_attr[0].starts_with("p.cedar:3:8: "),
        "{unknown_attr:?}"
    );
    assert!(
        unknown_attr[0].ends_with("attribute `nope` in context not found (did you mean `now`?)"),
        "{unknown_attr:?}"
    );

    let unguarded_tag = load(
        "@id(\"a\")\npermit(principal, action, resource)\nwhen { context.task.getTag(\"environment\") == \"x\" };\n",
    );
    assert!(
        unguarded_tag.iter().any(|p| p.starts_with("p.cedar:3:")),
        "{unguarded_tag:?}"
    );

    let no_id = load("// first\n\npermit(principal, action, resource);\n");
    assert_eq!(
        no_id,
        vec!["p.cedar:3:1: policy has no @id(\"…\") annotation".to_owned()]
    );
    let dup = load(
        "@id(\"a\")\npermit(principal, action, resource);\n@id(\"a\")\nforbid(principal, action, resource);\n",
    );
    assert_eq!(
        dup,
        vec!["p.cedar:3:1: @id(\"a\") is already used in p.cedar".to_owned()]
    );
    let bad_ttl = load("@id(\"a\")\n@max_ttl(\"soon\")\npermit(principal, action, resource);\n");
    assert!(bad_ttl[0].contains("@max_ttl(\"soon\")"), "{bad_ttl:?}");
    let typo = load("@id(\"a\")\n@aproval(\"required\")\npermit(principal, action, resource);\n");
    assert!(typo[0].contains("unknown annotation @aproval"), "{typo:?}");
    assert!(load("@id(\"a\")\npermit(principal, action, resource);\n").is_empty());
}

#[test]
fn the_loader_reads_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = CedarPolicy::load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no .cedar policy files"), "{err}");
    std::fs::write(
        dir.path().join("a.cedar"),
        "@id(\"a\")\npermit(principal, action, resource);\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let p = CedarPolicy::load_dir(dir.path()).unwrap();
    assert_eq!(p.len(), 1);
}

#[test]
fn reads_may_be_delegated_to_workers_only() {
    let p = shipped();
    let parent = task(&[("environment", "production")]);
    let delegate = |to: &str, scopes: &[&str]| {
        p.decide(&PolicyRequest {
            principal: &agent(),
            proof: &Proof::Certificate,
            action: Action::Delegate {
                delegate: &SpiffeId::new(to).unwrap(),
                envelope: &Envelope::new(&[TICKETS], scopes).unwrap(),
            },
            task: TaskFacts::of(&parent),
            ttl: Duration::from_secs(3600),
            now: Timestamp::now(),
        })
    };
    let worker = "spiffe://prod.example.com/agents/workers/summariser";
    let (id, ttl, approval) = permit(delegate(worker, &["read:tickets"]));
    assert_eq!(id, "delegate-reads-to-workers");
    assert_eq!(ttl, Some(Duration::from_secs(1800)));
    assert!(!approval);
    let (id, reason) = deny(delegate(worker, &["read:tickets", "write:tickets"]));
    assert_eq!(id, None);
    assert_eq!(
        reason,
        format!("no policy permits {} to delegate {worker}", agent())
    );
    assert!(matches!(
        delegate(
            "spiffe://prod.example.com/agents/support/other",
            &["read:tickets"]
        ),
        Decision::Deny { .. }
    ));
}

/// `principal in Mayfly::Path::"…"` matches whole segments below the path,
/// where `like "…/agents*"` would also match a sibling such as
/// `/agents-evil/…`.
#[test]
fn path_membership_is_segment_exact() {
    let p = shipped();
    let decide = |id: &str| {
        let mut t = task(&[]);
        t.agent = SpiffeId::new(id).unwrap();
        token(&p, &t, TICKETS, &["read:tickets"])
    };
    for inside in [
        "spiffe://prod.example.com/agents/support/triage",
        "spiffe://prod.example.com/agents/a",
    ] {
        permit(decide(inside));
    }
    for outside in [
        "spiffe://prod.example.com/agents",
        "spiffe://prod.example.com/agentsx/a",
        "spiffe://prod.example.com/agents-evil/a",
        "spiffe://prod.example.com/other/agents/a",
        "spiffe://prod.example.com.evil/agents/a",
    ] {
        let (policy, reason) = deny(decide(outside));
        assert_eq!(policy, None, "{outside}");
        assert!(reason.contains("no policy permits"), "{outside}: {reason}");
    }
    // A policy matching with `like` crosses segments; `in` does not.
    let loose = CedarPolicy::from_sources(
        &[(
            "p".to_owned(),
            r#"@id("loose") permit (principal, action, resource)
               when { principal.spiffe_id like "spiffe://prod.example.com/agents*" };
               @id("exact") permit (principal in Mayfly::Path::"spiffe://prod.example.com/agents", action, resource);"#
                .to_owned(),
        )],
        "test",
    )
    .unwrap();
    let mut t = task(&[]);
    t.agent = SpiffeId::new("spiffe://prod.example.com/agents-evil/a").unwrap();
    let (id, _, _) = permit(token(&loose, &t, TICKETS, &["read:tickets"]));
    assert_eq!(id, "loose");
    t.agent = SpiffeId::new("spiffe://prod.example.com/agents/a").unwrap();
    let (id, _, _) = permit(token(&loose, &t, TICKETS, &["read:tickets"]));
    assert_eq!(id, "exact,loose");
}

mod tool_calls {
    use super::*;
    use mayfly_core::{ArgumentLimits, Arguments, Route, Tool};

    fn call(p: &CedarPolicy, task: &Task, tool: &str, arguments: &str) -> Decision {
        call_as(
            p,
            task,
            (tool, arguments),
            None,
            &["read:billing"],
            &Binding::Bearer,
        )
    }

    /// Decides a call of `tool` under `task`, made with a token of
    /// `scopes` bound as `binding`.
    fn call_as(
        p: &CedarPolicy,
        task: &Task,
        (tool, arguments): (&str, &str),
        route: Option<Route<'_>>,
        scopes: &[&str],
        binding: &Binding,
    ) -> Decision {
        p.decide(&PolicyRequest {
            principal: &task.agent,
            proof: &Proof::Certificate,
            action: Action::CallTool {
                tool: &Tool::parse(tool).unwrap(),
                arguments: &Arguments::parse(arguments, &ArgumentLimits::default()).unwrap(),
                route,
                scopes: &parse_scopes(scopes).unwrap(),
                binding,
            },
            task: TaskFacts::of(task),
            ttl: Duration::from_secs(60),
            now: Timestamp::now(),
        })
    }

    #[test]
    fn the_shipped_billing_policies_decide_on_arguments() {
        let p = shipped();
        let t = task(&[]);
        let (id, _, approval) = permit(call(
            &p,
            &t,
            "billing/read_invoice",
            r#"{"invoice_id": "inv-1"}"#,
        ));
        assert_eq!((id.as_str(), approval), ("billing-reads", false));

        let small = r#"{"invoice_id": "inv-1", "amount": 99.5}"#;
        let (id, _, approval) = permit(call(&p, &t, "billing/pay_invoice", small));
        assert_eq!((id.as_str(), approval), ("billing-small-payments", false));
        let edge = r#"{"invoice_id": "inv-1", "amount": 100}"#;
        assert!(!permit(call(&p, &t, "billing/pay_invoice", edge)).2);

        let large = r#"{"invoice_id": "inv-1", "amount": 100.01}"#;
        let (id, _, approval) = permit(call(&p, &t, "billing/pay_invoice", large));
        assert_eq!(
            (id.as_str(), approval),
            ("billing-large-payments-approved", true)
        );

        let (id, reason) = deny(call(&p, &t, "billing/delete_records", "{}"));
        assert_eq!(id.as_deref(), Some("billing-no-deletes"));
        assert!(
            reason.contains("call billing/delete_records is forbidden"),
            "{reason}"
        );
    }

    #[test]
    fn arguments_outside_the_declaration_are_refused_before_policy() {
        let p = shipped();
        let t = task(&[]);
        for (tool, args, want) in [
            (
                "billing/refund",
                "{}",
                "tool billing/refund is not declared",
            ),
            (
                "billing/pay_invoice",
                r#"{"invoice_id": "i", "amount": 5, "override": true}"#,
                "argument \"override\" of billing/pay_invoice is not declared",
            ),
            (
                "billing/pay_invoice",
                r#"{"invoice_id": "i"}"#,
                "argument \"amount\" of billing/pay_invoice is missing",
            ),
            (
                "billing/pay_invoice",
                r#"{"invoice_id": "i", "amount": "5"}"#,
                "must be a number with at most four decimals",
            ),
            (
                "billing/pay_invoice",
                r#"{"invoice_id": "i", "amount": 0.00001}"#,
                "must be a number with at most four decimals",
            ),
            (
                "billing/read_invoice",
                r#"{"invoice_id": 7}"#,
                "argument \"invoice_id\" of billing/read_invoice must be a string",
            ),
        ] {
            let (id, reason) = deny(call(&p, &t, tool, args));
            assert_eq!(id, None, "{tool} {args}");
            assert!(reason.contains(want), "{tool} {args}: {reason}");
        }
        // An optional argument may be left out, or null.
        let (id, _) = deny(call(
            &p,
            &t,
            "billing/delete_records",
            r#"{"before": null}"#,
        ));
        assert_eq!(id.as_deref(), Some("billing-no-deletes"));
    }

    #[test]
    fn policies_see_the_route_scopes_and_binding_of_a_call() {
        let tools = "[api.create_payment]\nid = \"string\"\ncurrency = \"string\"\n".to_owned();
        let policy = r#"
            @id("post-only-with-dpop")
            permit (principal, action == Mayfly::Action::"api/create_payment", resource)
            when {
              context.method == "POST" && context.route == "/v1/payments/{id}" &&
              context.arguments.currency == "EUR" && context.scopes.contains("write:payments") &&
              context.binding == "dpop"
            };
        "#
        .to_owned();
        let p = CedarPolicy::from_sources(
            &[("tools.toml".into(), tools), ("p.cedar".into(), policy)],
            "test",
        )
        .unwrap();
        let t = task(&[]);
        let decide = |method: &str, currency: &str, binding: &Binding| {
            let args = format!(r#"{{"id": "p1", "currency": "{currency}"}}"#);
            let route = Route {
                method,
                template: "/v1/payments/{id}",
            };
            call_as(
                &p,
                &t,
                ("api/create_payment", &args),
                Some(route),
                &["write:payments"],
                binding,
            )
        };
        let dpop = Binding::Dpop {
            jkt: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I".into(),
        };
        // Each asked twice, interleaved: a decision kept for one call is
        // never given to another that differs in method, arguments or
        // binding.
        for _ in 0..2 {
            permit(decide("POST", "EUR", &dpop));
            deny(decide("PUT", "EUR", &dpop));
            deny(decide("POST", "USD", &dpop));
            deny(decide("POST", "EUR", &Binding::Bearer));
        }
    }

    #[test]
    fn kept_decisions_of_calls_follow_their_arguments() {
        let p = shipped();
        let t = task(&[]);
        let small = r#"{"invoice_id": "inv-1", "amount": 50}"#;
        let large = r#"{"invoice_id": "inv-1", "amount": 500}"#;
        // The same object written otherwise is decided the same.
        let small_again = r#"{ "amount" : 50.0, "invoice_id": "inv-1" }"#;
        for _ in 0..3 {
            assert!(!permit(call(&p, &t, "billing/pay_invoice", small)).2);
            assert!(permit(call(&p, &t, "billing/pay_invoice", large)).2);
            let (id, _, _) = permit(call(&p, &t, "billing/pay_invoice", small_again));
            assert_eq!(id, "billing-small-payments");
        }
    }

    #[test]
    fn a_policy_reading_an_argument_a_tool_lacks_is_refused_at_load() {
        let tools = "[billing.read_invoice]\ninvoice_id = \"string\"\n".to_owned();
        let policy = r#"
            @id("typo")
            permit (principal, action == Mayfly::Action::"billing/read_invoice", resource)
            when { context.arguments.amount > 5 };
        "#
        .to_owned();
        let err = CedarPolicy::from_sources(
            &[
                ("tools.toml".into(), tools.clone()),
                ("p.cedar".into(), policy),
            ],
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("p.cedar:"), "{err}");
        assert!(err.contains("amount"), "{err}");

        let undeclared = r#"
            @id("no-such-tool")
            permit (principal, action == Mayfly::Action::"billing/refund", resource);
        "#
        .to_owned();
        let err = CedarPolicy::from_sources(
            &[("tools.toml".into(), tools), ("p.cedar".into(), undeclared)],
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("billing/refund"), "{err}");

        let bad_tools = "[billing.pay]\namount = \"money\"\n".to_owned();
        let err = CedarPolicy::from_sources(
            &[
                ("tools.toml".into(), bad_tools),
                (
                    "p.cedar".into(),
                    "@id(\"x\") permit(principal, action, resource);".into(),
                ),
            ],
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("tools.toml:1:1:") && err.contains("money"),
            "{err}"
        );
    }

    #[test]
    fn a_policy_over_the_call_tool_group_names_tools_by_resource() {
        let tools = "[billing.read_invoice]\ninvoice_id = \"string\"\n[billing.pay_invoice]\namount = \"long\"\n";
        let policy = r#"
            @id("billing-reads")
            permit (principal, action in Mayfly::Action::"call_tool", resource == Mayfly::Tool::"billing/read_invoice");
        "#;
        let p = CedarPolicy::from_sources(
            &[
                ("tools.toml".into(), tools.into()),
                ("p.cedar".into(), policy.into()),
            ],
            "test",
        )
        .unwrap();
        assert_eq!(p.tools(), 2);
        let t = task(&[]);
        permit(call(
            &p,
            &t,
            "billing/read_invoice",
            r#"{"invoice_id": "i"}"#,
        ));
        let (_, reason) = deny(call(&p, &t, "billing/pay_invoice", r#"{"amount": 1}"#));
        assert!(
            reason.contains("no policy permits") && reason.contains("call billing/pay_invoice"),
            "{reason}"
        );

        // Reading an argument under the whole group fails validation: not
        // every tool has it.
        let err = CedarPolicy::from_sources(
            &[
                ("tools.toml".into(), tools.into()),
                (
                    "p.cedar".into(),
                    r#"@id("x") permit (principal, action in Mayfly::Action::"call_tool", resource) when { context.arguments.amount > 1 };"#.into(),
                ),
            ],
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("amount"), "{err}");
    }
}

#[test]
fn a_tool_is_listed_unless_policy_rules_out_every_call() {
    use mayfly_core::Tool;
    let p = shipped();
    let t = task(&[]);
    let may = |tool: &str| {
        p.decide(&PolicyRequest {
            principal: &t.agent,
            proof: &Proof::Certificate,
            action: Action::MayCallTool {
                tool: &Tool::parse(tool).unwrap(),
                scopes: &parse_scopes(&["read:billing"]).unwrap(),
                binding: &Binding::Bearer,
            },
            task: TaskFacts::of(&t),
            ttl: Duration::from_secs(60),
            now: Timestamp::now(),
        })
    };
    assert_eq!(permit(may("billing/read_invoice")).0, "billing-reads");
    // Some amounts pass, others need approval: listed, by both permits.
    let (ids, _, approval) = permit(may("billing/pay_invoice"));
    assert_eq!(
        ids,
        "billing-large-payments-approved,billing-small-payments"
    );
    assert!(!approval);
    let (id, reason) = deny(may("billing/delete_records"));
    assert_eq!(id.as_deref(), Some("billing-no-deletes"));
    assert!(reason.contains("no call lets"), "{reason}");
    let (id, reason) = deny(may("billing/refund"));
    assert_eq!(id, None);
    assert!(reason.contains("not declared"), "{reason}");

    // Another agent, whom no permit names, sees none of them.
    let mut other = task(&[]);
    other.agent = SpiffeId::new("spiffe://prod.example.com/services/batch").unwrap();
    let listed = p.decide(&PolicyRequest {
        principal: &other.agent,
        proof: &Proof::Certificate,
        action: Action::MayCallTool {
            tool: &Tool::parse("billing/read_invoice").unwrap(),
            scopes: &parse_scopes(&["read:billing"]).unwrap(),
            binding: &Binding::Bearer,
        },
        task: TaskFacts::of(&other),
        ttl: Duration::from_secs(60),
        now: Timestamp::now(),
    });
    let (id, _) = deny(listed);
    assert_eq!(id, None);
}
