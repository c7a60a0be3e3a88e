//! Agents without client certificates: over server-authenticated TLS, a
//! workload token in `authorization: Bearer …` proves the caller. Issuers
//! are run by the test itself (keys made per test, the Kubernetes JWKS
//! served over HTTPS from the test's own CA): a Kubernetes
//! service-account token, a GitHub-Actions-style OIDC token and a JWT-SVID
//! each open a task and get a token whose `sub` is the mapped SPIFFE ID;
//! refused tokens are UNAUTHENTICATED naming the check, with nothing
//! written; such a caller gets no certificate-bound token and no Admin
//! API; a token with a `jti` serves the one connection it was first
//! presented on and is a replay anywhere else; and an operator revokes
//! what it holds by its mapped SPIFFE ID.

use mayfly_client::{Client, pb};
use mayfly_testkit::oidc::unix_now;
use mayfly_testkit::{JwksServer, TestBroker, TokenIssuer};
use serde_json::{Value, json};
use tonic::Code;

use crate::common::*;

const K8S: &str = "https://kubernetes.default.svc.cluster.local";
const GITHUB: &str = "https://token.actions.githubusercontent.com";

struct Issuers {
    k8s: TokenIssuer,
    github: TokenIssuer,
    spire: TokenIssuer,
    _jwks: JwksServer,
}

/// A broker trusting three issuers, with policies that let any workload
/// of the trust domain open tasks and get tokens.
async fn broker() -> (TestBroker, Issuers) {
    broker_with(|_| {}).await
}

/// [`broker`], with `tweak` applied to its config last.
async fn broker_with(
    tweak: impl FnOnce(&mut mayfly_broker::config::Config) + Send + 'static,
) -> (TestBroker, Issuers) {
    let k8s = TokenIssuer::rsa(K8S, "k8s-1");
    let github = TokenIssuer::rsa(GITHUB, "gh-1");
    let spire = TokenIssuer::ec("", "spire-1");
    let jwks = JwksServer::start(TokenIssuer::jwks(&[&k8s])).await;
    let (gh_doc, bundle_doc, ca_pem, url) = (
        TokenIssuer::jwks(&[&github]),
        TokenIssuer::jwks(&[&spire]),
        jwks.ca_pem.clone(),
        jwks.url.clone(),
    );
    let broker = TestBroker::start_with(move |c| {
        let dir = c.data_dir.with_file_name("federation");
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let (ca, gh, bundle) = (
            path("k8s-ca.pem", &ca_pem),
            path("github.json", &gh_doc),
            path("bundle.json", &bundle_doc),
        );
        let text = format!(
            r#"
            [[federation]]
            issuer = "{K8S}"
            jwks_url = "{url}"
            ca = "{ca}"
            algorithms = ["RS256"]
            subject = "system:serviceaccount:{{ns}}:{{sa}}"
            spiffe_id = "spiffe://example.org/ns/{{ns}}/sa/{{sa}}"

            [[federation]]
            issuer = "{GITHUB}"
            jwks_file = "{gh}"
            audience = "mayfly"
            subject = "repo:octo-org/{{repo}}:ref:refs/heads/{{branch}}"
            spiffe_id = "spiffe://example.org/ci/{{repo}}/{{branch}}"
            claims = {{ repository_owner = "octo-org" }}

            [[federation]]
            spiffe_bundle = "{bundle}"
            algorithms = ["ES256"]
            "#
        );
        #[derive(serde::Deserialize)]
        struct Entries {
            federation: Vec<mayfly_broker::config::FederationConfig>,
        }
        c.federation = toml::from_str::<Entries>(&text).unwrap().federation;
        mayfly_testkit::use_policies(
            c,
            r#"@id("workloads")
permit (
  principal in Mayfly::Path::"spiffe://example.org",
  action in [Mayfly::Action::"start_task", Mayfly::Action::"issue_token"],
  resource
);

@id("payments-need-a-certificate")
forbid (
  principal,
  action == Mayfly::Action::"issue_token",
  resource == Mayfly::Audience::"https://payments.example.com"
) unless { principal.authenticated_by == "certificate" };

@id("tools-need-proof-of-possession")
forbid (
  principal,
  action == Mayfly::Action::"issue_token",
  resource == Mayfly::Audience::"https://tools.example.com"
) unless { principal.authenticated_by == "certificate" || context.binding == "dpop" };"#,
        );
        tweak(c);
    })
    .await;
    let issuers = Issuers {
        k8s,
        github,
        spire,
        _jwks: jwks,
    };
    (broker, issuers)
}

fn claims(broker: &TestBroker, iss: &str, sub: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": iss, "aud": [broker.config.issuer()], "sub": sub,
        "iat": now, "nbf": now, "exp": now + 600,
        "repository_owner": "octo-org",
    })
}

/// `msg` with the workload token as its bearer credential.
fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn start_with(client: &Client, token: &str) -> Result<pb::Task, tonic::Status> {
    start_for(client, token, &[API]).await
}

/// Opens a task for `audiences` with the workload token.
async fn start_for(
    client: &Client,
    token: &str,
    audiences: &[&str],
) -> Result<pb::Task, tonic::Status> {
    client
        .broker()
        .start_task(with_token(
            start_request("federated work", audiences, &["read:files"]),
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn issue_with(
    client: &Client,
    task: &str,
    token: &str,
) -> Result<pb::IssuedToken, tonic::Status> {
    client
        .broker()
        .issue_token(with_token(token_request(task, API, &["read:files"]), token))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_workload_token_opens_a_task_and_gets_a_token() {
    let (broker, issuers) = broker().await;
    let client = broker.anonymous_client().await;
    let svid = claims(&broker, "", "spiffe://example.org/agent/spire-workload");
    let mut svid_claims = svid;
    svid_claims.as_object_mut().unwrap().remove("iss");
    for (token, id, issuer) in [
        (
            issuers
                .k8s
                .sign(&claims(&broker, K8S, "system:serviceaccount:prod:billing")),
            "spiffe://example.org/ns/prod/sa/billing",
            K8S,
        ),
        (
            issuers.github.sign(&{
                // GitHub's tokens carry the audience the workflow asked
                // for, configured per issuer.
                let mut c = claims(&broker, GITHUB, "repo:octo-org/api:ref:refs/heads/main");
                c["aud"] = json!("mayfly");
                c
            }),
            "spiffe://example.org/ci/api/main",
            GITHUB,
        ),
        (
            issuers.spire.sign(&svid_claims),
            "spiffe://example.org/agent/spire-workload",
            "spiffe://example.org",
        ),
    ] {
        let task = start_with(&client, &token).await.unwrap();
        assert_eq!(task.agent_id, id);
        let issued = issue_with(&client, &task.task_id, &token).await.unwrap();
        let got = validate(&broker, &issued.token, API).await;
        assert_eq!(got["sub"], id);

        // No certificate to bind to: refused, naming the way out.
        let mut bound = token_request(&task.task_id, API, &["read:files"]);
        bound.bind_to_client_cert = true;
        assert_status(
            client.broker().issue_token(with_token(bound, &token)).await,
            Code::InvalidArgument,
            "cannot be bound to one: ask for a DPoP-bound token",
        );
        // The trail names how the caller was proven.
        let trail = std::fs::read_to_string(broker.config.audit_path()).unwrap();
        let started = trail
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["event"] == "task_started" && r["task_id"] == task.task_id.as_str())
            .unwrap();
        assert_eq!(started["authenticated_by"], issuer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_connects_with_a_workload_token() {
    let (broker, issuers) = broker().await;
    let token = issuers
        .k8s
        .sign(&claims(&broker, K8S, "system:serviceaccount:prod:billing"));
    let client = Client::connect_with_token(&broker.url(), &broker.bundle_pem(), &token)
        .await
        .unwrap();
    assert!(
        !format!("{client:?}").contains(&token[..20]),
        "the token never shows in Debug"
    );
    let task = client
        .start_task(mayfly_client::NewTask::new("federated work", [API]).scope("read:files"))
        .await
        .unwrap();
    let issued = task.issue_token(API, ["read:files"]).await.unwrap();
    let got = validate(&broker, &issued.token, API).await;
    assert_eq!(got["sub"], "spiffe://example.org/ns/prod/sa/billing");
    task.complete().await.unwrap();
    // A token that cannot be a header value is refused before connecting.
    assert!(matches!(
        Client::connect_with_token(&broker.url(), &broker.bundle_pem(), "a\nb").await,
        Err(mayfly_client::ClientError::BadToken)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_unauthenticated_and_writes_nothing() {
    let (broker, issuers) = broker().await;
    let client = broker.anonymous_client().await;
    let op = broker.operator().await;
    let before = all_leases(&op, pb::ListLeasesRequest::default())
        .await
        .len();
    let sub = "system:serviceaccount:prod:billing";
    let with = |k: &str, v: Value| {
        let mut c = claims(&broker, K8S, sub);
        c[k] = v;
        c
    };
    let now = unix_now();
    // A client with a source of tokens renews on this name.
    let expired = issuers.k8s.sign(&with("exp", json!(now - 300)));
    let refused = start_with(&client, &expired).await.unwrap_err();
    assert_eq!(
        refused.metadata().get("mayfly-error").unwrap(),
        "workload_token_expired"
    );
    for (token, needle) in [
        (expired, "expired"),
        (
            issuers.k8s.sign(&with("aud", json!(["https://elsewhere"]))),
            "audience",
        ),
        (
            issuers
                .k8s
                .sign(&with("iss", json!("https://evil.example"))),
            "is not trusted",
        ),
        (
            issuers.github.sign(&claims(&broker, K8S, sub)),
            "is not one of issuer",
        ),
        (
            issuers
                .k8s
                .sign(&with("sub", json!("system:serviceaccount:a:b/c"))),
            "is refused",
        ),
        (
            issuers.spire.sign(&json!({
                "sub": "spiffe://other.example/agent/x", "aud": broker.config.issuer(),
                "iat": now, "exp": now + 60,
            })),
            "trust domain",
        ),
        ("not-a-token".to_owned(), "malformed"),
    ] {
        assert_status(
            start_with(&client, &token).await,
            Code::Unauthenticated,
            needle,
        );
    }
    // Without any credential at all, as before.
    assert_status(
        client
            .broker()
            .start_task(start_request("x", &[API], &["read:files"]))
            .await,
        Code::Unauthenticated,
        "no client certificate",
    );
    let after = all_leases(&op, pb::ListLeasesRequest::default())
        .await
        .len();
    assert_eq!(after, before, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_api_for_token_callers_and_revocation_by_mapped_id() {
    let (broker, issuers) = broker().await;
    let client = broker.anonymous_client().await;
    let token = issuers
        .k8s
        .sign(&claims(&broker, K8S, "system:serviceaccount:prod:billing"));
    let task = start_with(&client, &token).await.unwrap();
    let issued = issue_with(&client, &task.task_id, &token).await.unwrap();

    // A token of an operator's SPIFFE ID is still no way into Admin.
    let operator = issuers.spire.sign(&json!({
        "sub": "spiffe://example.org/operator/admin", "aud": broker.config.issuer(),
        "iat": unix_now(), "exp": unix_now() + 60,
    }));
    assert_status(
        client
            .admin()
            .revoke_agent(with_token(
                pb::RevokeAgentRequest {
                    agent_id: "spiffe://example.org/ns/prod/sa/billing".into(),
                    note: String::new(),
                },
                &operator,
            ))
            .await,
        Code::PermissionDenied,
        "needs a client certificate",
    );

    // The operator revokes the workload by its mapped SPIFFE ID.
    broker
        .operator()
        .await
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            agent_id: "spiffe://example.org/ns/prod/sa/billing".into(),
            note: "compromised pod".into(),
        })
        .await
        .unwrap();
    let l = lease(&broker.operator().await, &issued.lease_id).await;
    assert_eq!(l.state, pb::LeaseState::Revoked as i32);
    // Its task ended with it: the same token gets nothing more under it.
    let e = issue_with(&client, &task.task_id, &token)
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert!(
        e.message().contains("revoked") || e.message().contains("ended"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_jti_serves_one_connection_and_is_a_replay_elsewhere() {
    let (broker, issuers) = broker().await;
    let mut c = claims(&broker, GITHUB, "repo:octo-org/api:ref:refs/heads/main");
    c["aud"] = json!("mayfly");
    c["jti"] = json!("run-42-attempt-1");
    let token = issuers.github.sign(&c);
    // The connection it is first presented on keeps a session for it.
    let first = broker.anonymous_client().await;
    let task = start_with(&first, &token).await.unwrap();
    issue_with(&first, &task.task_id, &token).await.unwrap();
    issue_with(&first, &task.task_id, &token).await.unwrap();
    // Anywhere else, it was already used.
    let thief = broker.anonymous_client().await;
    let refused = start_with(&thief, &token).await.unwrap_err();
    assert_eq!(
        refused.metadata().get("mayfly-error").unwrap(),
        "workload_token_used"
    );
    assert_status(
        Err::<(), _>(refused),
        Code::Unauthenticated,
        "was already used (jti replay)",
    );
    // A fresh token (a new jti) opens a new session.
    c["jti"] = json!("run-42-attempt-2");
    start_with(&thief, &issuers.github.sign(&c)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_takes_a_workload_token_as_client_assertion() {
    let (broker, issuers) = broker().await;
    let sub = "system:serviceaccount:prod:billing";
    let client = broker.anonymous_client().await;
    let task = start_with(&client, &issuers.k8s.sign(&claims(&broker, K8S, sub)))
        .await
        .unwrap();
    let url = format!("{}/oauth2/token", broker.http_url());
    let form = |assertion: &str, binding: &str| {
        format!(
            "grant_type=client_credentials\
             &client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
             &client_assertion={assertion}&resource=https%3A%2F%2Fapi.example.com\
             &scope=read%3Afiles&task_id={}{binding}",
            task.task_id
        )
    };
    let post = |body: String, cert: Option<mayfly_testkit::Credential>| {
        let (url, ca) = (url.clone(), broker.bundle_pem());
        async move {
            let (status, _, body) =
                mayfly_testkit::https_post_form(&url, &ca, cert.as_ref(), &body).await;
            (status, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let assertion = |jti: &str| {
        let mut c = claims(&broker, K8S, sub);
        c["jti"] = json!(jti);
        issuers.k8s.sign(&c)
    };

    let first = assertion("assertion-1");
    let (status, body) = post(form(&first, "&token_binding=none"), None).await;
    assert_eq!(status, 200, "{body}");
    let got = validate(&broker, body["access_token"].as_str().unwrap(), API).await;
    assert_eq!(got["sub"], "spiffe://example.org/ns/prod/sa/billing");

    // Used once: the same assertion again is a replay.
    let (status, body) = post(form(&first, "&token_binding=none"), None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "invalid_client");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{body}"
    );
    // An expired one names the check.
    let mut old = claims(&broker, K8S, sub);
    old["exp"] = json!(unix_now() - 300);
    let (status, body) = post(form(&issuers.k8s.sign(&old), "&token_binding=none"), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    // No certificate to bind the token to.
    let (status, body) = post(form(&assertion("assertion-2"), ""), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("cannot be bound")
    );
    // A certificate and an assertion: one method per request.
    let agent = broker
        .ca()
        .issue_svid(
            &mayfly_core::SpiffeId::new("spiffe://example.org/agent/demo").unwrap(),
            std::time::Duration::from_secs(600),
        )
        .unwrap();
    let (status, body) = post(
        form(&assertion("assertion-3"), "&token_binding=none"),
        Some(agent),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    // So is a refused certificate (here, of a CA the broker does not
    // trust) beside an assertion: a token proves only a peer that
    // presented none.
    let stranger =
        mayfly_broker::dev::DevCa::generate(&mayfly_core::TrustDomain::new("example.org").unwrap())
            .unwrap()
            .issue_svid(
                &mayfly_core::SpiffeId::new("spiffe://example.org/agent/demo").unwrap(),
                std::time::Duration::from_secs(600),
            )
            .unwrap();
    let (status, body) = post(
        form(&assertion("assertion-4"), "&token_binding=none"),
        Some(stranger),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    // The metadata says so.
    let (_, meta) = mayfly_testkit::https_get(
        &format!(
            "{}/.well-known/oauth-authorization-server",
            broker.http_url()
        ),
        &broker.bundle_pem(),
    )
    .await;
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["tls_client_auth", "private_key_jwt"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_can_ask_for_dpop_from_a_token_caller() {
    let (broker, issuers) = broker().await;
    let token = issuers
        .k8s
        .sign(&claims(&broker, K8S, "system:serviceaccount:prod:billing"));
    let client = broker.anonymous_client().await;
    let task = start_for(&client, &token, &[TOOLS]).await.unwrap();
    let mut req = token_request(&task.task_id, TOOLS, &["read:files"]);
    assert_status(
        client
            .broker()
            .issue_token(with_token(req.clone(), &token))
            .await,
        Code::PermissionDenied,
        "tools-need-proof-of-possession",
    );
    let key = mayfly_testkit::DpopKey::new();
    req.dpop_jwk = key.jwk().to_string();
    let issued = client
        .broker()
        .issue_token(with_token(req, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.token_type, "DPoP");
    assert_eq!(
        claims_unverified(&issued.token)["cnf"]["jkt"],
        key.thumbprint()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_can_ask_for_a_certificate() {
    let (broker, issuers) = broker().await;
    let payments = "https://payments.example.com";
    let token = issuers
        .k8s
        .sign(&claims(&broker, K8S, "system:serviceaccount:prod:billing"));
    let client = broker.anonymous_client().await;
    let task = start_for(&client, &token, &[API, payments]).await.unwrap();
    // The same workload may read the API with its token...
    issue_with(&client, &task.task_id, &token).await.unwrap();
    // ...but payments want the stronger proof.
    assert_status(
        client
            .broker()
            .issue_token(with_token(
                token_request(&task.task_id, payments, &["read:files"]),
                &token,
            ))
            .await,
        Code::PermissionDenied,
        "payments-need-a-certificate",
    );
    // A certificate caller of the trust domain gets it.
    let agent = broker.agent().await;
    let own = agent
        .broker()
        .start_task(start_request("pay invoices", &[payments], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    agent
        .broker()
        .issue_token(token_request(&own.task_id, payments, &["read:files"]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_callers_connection_counts_as_authenticated() {
    // Two anonymous connections per source, closed after two idle seconds.
    let idle = std::time::Duration::from_secs(2);
    let (broker, issuers) = broker_with(move |c| {
        c.connections.max_unauthenticated = 3;
        c.connections.max_unauthenticated_per_source = 2;
        c.connections.unauthenticated_idle_timeout = idle;
    })
    .await;
    // Six token callers from one address, each on its own connection (as
    // pods behind one node address): past the first two, each would be
    // refused if proving a caller by token left the connection anonymous.
    let mut callers = Vec::new();
    for n in 0..6 {
        let mut c = claims(
            &broker,
            K8S,
            &format!("system:serviceaccount:prod:worker-{n}"),
        );
        c["jti"] = json!(format!("pod-{n}"));
        let token = issuers.k8s.sign(&c);
        let client = broker.anonymous_client().await;
        let task = start_with(&client, &token).await.unwrap();
        callers.push((client, token, task.task_id));
    }
    let m = scrape(&broker).await;
    assert_eq!(
        count(
            &m,
            "mayfly_connections{port=\"grpc\",state=\"authenticated\"}"
        ),
        6.0,
        "{m}"
    );
    assert_eq!(
        count(
            &m,
            "mayfly_connections{port=\"grpc\",state=\"unauthenticated\"}"
        ),
        0.0,
        "{m}"
    );
    // Idle past the anonymous timeout, the connection is still open: its
    // session still holds the token, which on a new connection would be a
    // replay.
    tokio::time::sleep(idle * 2).await;
    let (client, token, task) = &callers[0];
    issue_with(client, task, token).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_introspection_take_a_client_assertion() {
    let (broker, issuers) = broker_with(|c| {
        c.introspection = vec![mayfly_broker::config::IntrospectionConfig {
            clients: vec![
                "spiffe://example.org/ns/prod/sa/api-gateway"
                    .parse()
                    .unwrap(),
            ],
            audiences: vec![API.into()],
        }];
    })
    .await;
    let assertion = |sub: &str, jti: &str| {
        let mut c = claims(&broker, K8S, &format!("system:serviceaccount:prod:{sub}"));
        c["jti"] = json!(jti);
        issuers.k8s.sign(&c)
    };
    let client = broker.anonymous_client().await;
    let login = assertion("billing", "grpc-1");
    let task = start_with(&client, &login).await.unwrap();
    let access = issue_with(&client, &task.task_id, &login)
        .await
        .unwrap()
        .token;
    let other = issue_with(&client, &task.task_id, &login)
        .await
        .unwrap()
        .token;
    const JWT_BEARER: &str = "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer";
    let post = |path: &str, body: String| {
        let (url, ca) = (format!("{}{path}", broker.http_url()), broker.bundle_pem());
        async move {
            let (status, _, body) = mayfly_testkit::https_post_form(&url, &ca, None, &body).await;
            (status, body)
        }
    };
    let form = |assertion: &str, token: &str| {
        format!("client_assertion_type={JWT_BEARER}&client_assertion={assertion}&token={token}")
    };

    // The API gateway, a workload of the cluster, introspects by assertion.
    let (status, body) = post(
        "/introspect",
        form(&assertion("api-gateway", "gw-1"), &access),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["active"], true, "{answer}");
    assert_eq!(answer["sub"], "spiffe://example.org/ns/prod/sa/billing");
    // Another workload is not an introspector.
    let (status, body) = post("/introspect", form(&assertion("billing", "b-1"), &access)).await;
    assert_eq!(status, 403, "{body}");
    // A replayed assertion is not a client.
    let (status, body) = post(
        "/introspect",
        form(&assertion("api-gateway", "gw-1"), &access),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("invalid_client") && body.contains("already used"),
        "{body}"
    );

    // The agent revokes its own token by assertion; another workload cannot.
    let (status, body) = post(
        "/oauth2/revoke",
        form(&assertion("intruder", "i-1"), &other),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unauthorized_client"), "{body}");
    let (_, body) = post(
        "/introspect",
        form(&assertion("api-gateway", "gw-3"), &other),
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["active"],
        true
    );
    let (status, body) = post(
        "/oauth2/revoke",
        form(&assertion("billing", "b-2"), &access),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(
        "/introspect",
        form(&assertion("api-gateway", "gw-2"), &access),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["active"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_keeps_presenting_refused_tokens_is_closed() {
    let (broker, issuers) = broker().await;
    let closed = |m: &str| {
        count(
            m,
            "mayfly_connections_closed_total{port=\"grpc\",reason=\"refused_tokens\"}",
        )
    };
    let guesser = broker.anonymous_client().await;
    let mut c = claims(&broker, K8S, "system:serviceaccount:prod:billing");
    c["aud"] = json!("https://elsewhere.example");
    let wrong = issuers.k8s.sign(&c);
    let limit = mayfly_broker::MAX_REFUSED_TOKENS;
    for _ in 1..limit {
        assert_status(
            start_with(&guesser, &wrong).await,
            Code::Unauthenticated,
            "audience",
        );
    }
    assert_eq!(closed(&scrape(&broker).await), 0.0);
    // One more refusal, and the broker closes the connection.
    assert_status(
        start_with(&guesser, &wrong).await,
        Code::Unauthenticated,
        "audience",
    );
    eventually("the connection was never closed", || async {
        closed(&scrape(&broker).await) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_of_a_token_on_one_connection_all_pass() {
    let (broker, issuers) = broker().await;
    let mut c = claims(&broker, K8S, "system:serviceaccount:prod:billing");
    c["jti"] = json!("fresh-token");
    let token = issuers.k8s.sign(&c);
    // An async agent starting several calls at once with a new token: one
    // verification records its jti, the others wait for its session
    // rather than be refused as replays of it.
    let client = broker.anonymous_client().await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, token) = (client.clone(), token.clone());
        calls.spawn(async move { start_with(&client, &token).await });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
}
