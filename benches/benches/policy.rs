//! What a Cedar decision costs at request time, against the ES256 signature
//! every token needs anyway (measured in the same run): the shipped example
//! policies (`deploy/policies`) deciding a permit, a forbid and a default
//! deny; the same permit with 100 and 1000 more policies, each for one
//! other agent (which the per-agent slices leave out); and the fixed cost of
//! a decision apart from its policies. Each is a fresh request (a new task
//! id each time), so Cedar evaluates it; `kept` is the same request again,
//! answered from the decisions kept for policies that ignore the time.
//!
//! `cargo bench -p mayfly-benches --bench policy`

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mayfly_broker::issuer::Algorithm;
use mayfly_broker::issuer::{JwtSigner, SigningKey};
use mayfly_core::{
    AccessTokenClaims, Action, Audience, Binding, Decision, Envelope, Intent, Policy,
    PolicyRequest, Proof, Scopes, SpiffeId, Task, TaskContext, TaskFacts, TaskId, Timestamp,
    parse_scopes,
};
use mayfly_policy::CedarPolicy;

const TICKETS: &str = "https://tickets.prod.example.com";

fn shipped_sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policies");
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cedar") {
            let text = std::fs::read_to_string(&path).unwrap();
            sources.push((path.display().to_string(), text));
        }
    }
    sources
}

/// The shipped policies plus `extra` permits, one per (other) agent, shaped
/// like the shipped read permit.
fn policies(extra: usize) -> CedarPolicy {
    let mut sources = shipped_sources();
    let generated: String = (0..extra)
        .map(|i| {
            format!(
                "@id(\"agent-{i}-reads\")\n@max_ttl(\"10m\")\n\
                 permit (principal == Mayfly::Agent::\"spiffe://prod.example.com/agents/other/{i}\",\n\
                 action == Mayfly::Action::\"issue_token\", resource)\n\
                 when {{ [\"read\"].containsAll(context.scope_prefixes) }};\n\n"
            )
        })
        .collect();
    if extra > 0 {
        sources.push(("generated.cedar".into(), generated));
    }
    CedarPolicy::from_sources(&sources, "bench").unwrap()
}

fn task(context: &[(&str, &str)]) -> Task {
    Task {
        id: TaskId::generate(),
        agent: SpiffeId::new("spiffe://prod.example.com/agents/support/triage").unwrap(),
        intent: Intent::new("triage the queue").unwrap(),
        context: TaskContext::new(context.iter().copied()).unwrap(),
        envelope: Envelope::new(&[TICKETS], &["read:tickets", "export:tickets"]).unwrap(),
        created_at: Timestamp::now(),
        expires_at: Timestamp::now().plus(Duration::from_secs(3600)),
        revision: 0,
        parent: None,
        delegated_by: Vec::new(),
        authenticated_by: mayfly_core::Proof::Certificate,
    }
}

/// One token request, parsed as the broker's edge parses it, so the
/// benchmark times the decision alone.
struct Ask {
    task: Task,
    audience: Audience,
    scopes: Scopes,
}

fn ask(context: &[(&str, &str)], scopes: &[&str]) -> Ask {
    Ask {
        task: task(context),
        audience: Audience::new(TICKETS).unwrap(),
        scopes: parse_scopes(scopes).unwrap(),
    }
}

/// `a` under a task never asked about before.
fn fresh(a: &Ask) -> Ask {
    let mut task = a.task.clone();
    task.id = TaskId::generate();
    Ask {
        task,
        audience: a.audience.clone(),
        scopes: a.scopes.clone(),
    }
}

/// Times deciding `a` as a new request each time.
fn bench_fresh(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: String,
    p: &CedarPolicy,
    a: &Ask,
) {
    g.bench_function(name, |b| {
        b.iter_batched(|| fresh(a), |a| decide(p, &a), BatchSize::SmallInput)
    });
}

fn decide(p: &CedarPolicy, a: &Ask) -> Decision {
    p.decide(&PolicyRequest {
        principal: &a.task.agent,
        proof: &Proof::Certificate,
        action: Action::IssueToken {
            audience: &a.audience,
            scopes: &a.scopes,
            binding: &Binding::Certificate {
                x5t_s256: "x5t".into(),
            },
        },
        task: TaskFacts::of(&a.task),
        ttl: Duration::from_secs(300),
        now: Timestamp::now(),
    })
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("cedar");
    g.throughput(Throughput::Elements(1));
    let read = ask(&[("environment", "staging")], &["read:tickets"]);
    let export = ask(&[("data_sensitivity", "restricted")], &["export:tickets"]);
    let admin = ask(&[("environment", "staging")], &["admin:tickets"]);
    for extra in [0, 100, 1000] {
        let p = policies(extra);
        let n = p.len();
        assert!(matches!(decide(&p, &read), Decision::Permit { .. }));
        bench_fresh(&mut g, format!("permit_read/{n}_policies"), &p, &read);
        if extra == 0 {
            g.bench_function(format!("permit_read_kept/{n}_policies"), |b| {
                b.iter(|| decide(&p, &read))
            });
        }
        if extra == 0 {
            assert!(matches!(
                decide(&p, &export),
                Decision::Deny {
                    policy_id: Some(_),
                    ..
                }
            ));
            bench_fresh(&mut g, format!("forbid_export/{n}_policies"), &p, &export);
            assert!(matches!(
                decide(&p, &admin),
                Decision::Deny {
                    policy_id: None,
                    ..
                }
            ));
            bench_fresh(&mut g, format!("default_deny/{n}_policies"), &p, &admin);
        }
    }
    // The cost of a decision apart from its policies: building the Cedar
    // request, entities and context, and reading the answer.
    let one = CedarPolicy::from_sources(
        &[(
            "one.cedar".into(),
            "@id(\"one\")\npermit (principal, action, resource);\n".into(),
        )],
        "one",
    )
    .unwrap();
    bench_fresh(&mut g, "fixed_cost/1_policy".into(), &one, &read);
    g.finish();
}

/// The limit the decision is read against: the ES256 signature of a token.
fn signature(c: &mut Criterion) {
    let der = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_der();
    let signer = JwtSigner::new(
        SigningKey::from_pkcs8(&der, Algorithm::ES256).unwrap(),
        vec![],
    );
    let claims = AccessTokenClaims {
        iss: "https://mayfly.prod.example.com".into(),
        sub: "spiffe://prod.example.com/agents/support/triage".into(),
        aud: TICKETS.into(),
        exp: 1_800_000_300,
        iat: 1_800_000_000,
        nbf: 1_800_000_000,
        jti: "p_mMsUbnboE9enWz_ooAFw".into(),
        client_id: "spiffe://prod.example.com/agents/support/triage".into(),
        scope: Some("read:tickets".into()),
        task_id: "lbaPf1dJlLwnMXaf5bpjpA".into(),
        cnf: None,
        act: None,
        status: None,
    };
    let mut g = c.benchmark_group("cedar");
    g.throughput(Throughput::Elements(1));
    g.bench_function("jwt_sign_es256_reference", |b| {
        b.iter(|| signer.sign(&claims).unwrap())
    });
    g.finish();
}

criterion_group!(benches, decisions, signature);
criterion_main!(benches);
