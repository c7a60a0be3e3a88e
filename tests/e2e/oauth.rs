//! The OAuth 2.0 front door on the HTTPS port: `POST /oauth2/token`
//! (client credentials inside a task, with approvals as RFC 8628
//! polling), `POST /oauth2/revoke` (RFC 7009) and the metadata that names
//! them, driven with plain HTTPS requests over mTLS as any OAuth client
//! sends them.

use std::time::Duration;

use mayfly_client::{Client, pb};
use mayfly_testkit::{
    Credential, DpopKey, TestBroker, https_get, https_post_form, https_post_form_with,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use crate::common::*;

const AGENT: &str = "spiffe://example.org/agent/demo";

/// A fresh X.509-SVID for `id`, as a stock client would load from disk.
fn svid(broker: &TestBroker, id: &str) -> Credential {
    broker
        .ca()
        .issue_svid(&id.parse().unwrap(), Duration::from_secs(600))
        .unwrap()
}

/// POSTs `form` to `path` as `who`; the status and the JSON body (or
/// `null` for an empty one).
async fn post(
    broker: &TestBroker,
    path: &str,
    who: Option<&Credential>,
    form: &str,
) -> (u16, Value) {
    let (status, _, body) = https_post_form(
        &format!("{}{path}", broker.http_url()),
        &broker.bundle_pem(),
        who,
        form,
    )
    .await;
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"))
    };
    (status, json)
}

/// The agent's leases, as an operator sees them.
async fn leases_of(op: &Client, agent: &str) -> Vec<pb::Lease> {
    all_leases(
        op,
        pb::ListLeasesRequest {
            agent_id: agent.into(),
            ..Default::default()
        },
    )
    .await
}

fn token_form(task: &str, resource: &str, scope: &str) -> String {
    format!("grant_type=client_credentials&task_id={task}&resource={resource}&scope={scope}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_names_every_endpoint_at_both_well_known_addresses() {
    let broker = TestBroker::start().await;
    let iss = broker.issuer();
    let (status, oauth) = https_get(
        &format!(
            "{}/.well-known/oauth-authorization-server",
            broker.http_url()
        ),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, oidc) = https_get(
        &format!("{}/.well-known/openid-configuration", broker.http_url()),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(oauth, oidc);
    let m: Value = serde_json::from_str(&oauth).unwrap();
    assert_eq!(m["issuer"], iss.as_str());
    assert_eq!(m["token_endpoint"], format!("{iss}/oauth2/token"));
    // Named for strict metadata parsers, and refusing everything.
    assert_eq!(
        m["authorization_endpoint"],
        format!("{iss}/oauth2/authorize")
    );
    let (status, body) = https_get(
        &format!(
            "{}/oauth2/authorize?response_type=code&client_id=x",
            broker.http_url()
        ),
        &broker.bundle_pem(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("unsupported_response_type"), "{body}");
    assert_eq!(m["revocation_endpoint"], format!("{iss}/oauth2/revoke"));
    assert_eq!(m["introspection_endpoint"], format!("{iss}/introspect"));
    assert_eq!(
        m["grant_types_supported"],
        serde_json::json!([
            "client_credentials",
            "urn:ietf:params:oauth:grant-type:token-exchange"
        ])
    );
    assert_eq!(
        m["dpop_signing_alg_values_supported"],
        serde_json::json!(["ES256", "EdDSA"])
    );
    assert_eq!(
        m["token_endpoint_auth_methods_supported"],
        serde_json::json!(["tls_client_auth"])
    );
    assert_eq!(m["tls_client_certificate_bound_access_tokens"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_issues_a_token_bound_to_the_client_certificate_inside_the_task() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = start(&agent).await;
    let me = svid(&broker, AGENT);
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&me),
        &format!(
            "{}&client_id={AGENT}",
            token_form(&task.task_id, API, "read:files")
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "read:files");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((1..=300).contains(&expires_in), "{body}");
    let token = body["access_token"].as_str().unwrap();

    // A stock JWT library accepts it against the JWKS; it is the task's,
    // for the requested resource, and bound to the certificate the client
    // authenticated with (RFC 8705).
    let claims = validate(&broker, token, API).await;
    assert_eq!(claims["task_id"], task.task_id.as_str());
    assert_eq!(claims["client_id"], AGENT);
    assert_eq!(claims["scope"], "read:files");
    let der = CertificateDer::from_pem_slice(me.cert_pem.as_bytes()).unwrap();
    assert_eq!(
        claims["cnf"]["x5t#S256"],
        mayfly_verify::cert_thumbprint(&der).as_str()
    );

    // It is a lease of the task like any other, and ends with it.
    let l = lease(&op, claims["jti"].as_str().unwrap()).await;
    assert_eq!(l.task_id, task.task_id);
    assert_eq!(l.state, pb::LeaseState::Active as i32);
    agent.complete_task(&task.task_id).await.unwrap();
    let l = lease(&op, claims["jti"].as_str().unwrap()).await;
    assert_eq!(l.state, pb::LeaseState::Revoked as i32);
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&me),
        &token_form(&task.task_id, API, "read:files"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("is completed"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_names_its_rfc_error_and_writes_nothing() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = start(&agent).await;
    let other_agent = broker.client_as("spiffe://example.org/agent/other").await;
    let others_task = start(&other_agent).await;
    let wide = agent
        .broker()
        .start_task(start_request(
            "e2e",
            &[API, TOOLS],
            &["read:files", "write:files"],
        ))
        .await
        .unwrap()
        .into_inner();
    let me = svid(&broker, AGENT);
    let t = task.task_id.as_str();
    // What, as whom, the form, and the status, error and words expected.
    type Case<'a> = (
        &'a str,
        Option<&'a Credential>,
        String,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "no client certificate",
            None,
            token_form(t, API, "read:files"),
            401,
            "invalid_client",
            "no client certificate",
        ),
        (
            "no grant_type",
            Some(&me),
            format!("task_id={t}&resource={API}"),
            400,
            "invalid_request",
            "grant_type",
        ),
        (
            "unknown grant",
            Some(&me),
            format!("grant_type=authorization_code&code=x&task_id={t}"),
            400,
            "unsupported_grant_type",
            "authorization_code",
        ),
        (
            "no task_id",
            Some(&me),
            format!("grant_type=client_credentials&resource={API}"),
            400,
            "invalid_request",
            "task_id",
        ),
        (
            "malformed task_id",
            Some(&me),
            token_form("x", API, "read:files"),
            400,
            "invalid_request",
            "task_id",
        ),
        (
            "another agent's task",
            Some(&me),
            token_form(&others_task.task_id, API, "read:files"),
            400,
            "invalid_grant",
            "not found",
        ),
        (
            "no resource",
            Some(&me),
            format!("grant_type=client_credentials&task_id={t}"),
            400,
            "invalid_target",
            "resource",
        ),
        (
            "malformed resource",
            Some(&me),
            token_form(t, "api.example.com", "read:files"),
            400,
            "invalid_target",
            "absolute URI",
        ),
        (
            "resource with a fragment",
            Some(&me),
            token_form(t, "https://api.example.com/%23x", "read:files"),
            400,
            "invalid_target",
            "fragment",
        ),
        (
            "resource outside the envelope",
            Some(&me),
            token_form(t, "https://other.example.com", "read:files"),
            400,
            "invalid_target",
            "other.example.com",
        ),
        (
            "scope outside the envelope",
            Some(&me),
            token_form(t, API, "admin:all"),
            400,
            "invalid_scope",
            "admin:all",
        ),
        (
            "malformed scope",
            Some(&me),
            token_form(t, API, "read:files++write:files"),
            400,
            "invalid_scope",
            "single spaces",
        ),
        (
            "a parameter twice",
            Some(&me),
            format!("{}&scope=write:files", token_form(t, API, "read:files")),
            400,
            "invalid_request",
            "more than once",
        ),
        (
            "another client_id",
            Some(&me),
            format!(
                "{}&client_id=spiffe://example.org/agent/other",
                token_form(t, API, "read:files")
            ),
            401,
            "invalid_client",
            "client_id",
        ),
        (
            "audience not in the envelope",
            Some(&me),
            token_form(t, TOOLS, "read:files"),
            400,
            "invalid_target",
            "tools.example.com",
        ),
        (
            "policy denies",
            Some(&me),
            token_form(&wide.task_id, TOOLS, "write:files"),
            400,
            "access_denied",
            "denied",
        ),
    ];
    let before = leases_of(&op, AGENT).await.len();
    for (what, who, form, status, error, needle) in cases {
        let (got, body) = post(&broker, "/oauth2/token", who, &form).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(error)),
            "{what}: {body}"
        );
        let said = body["error_description"].as_str().unwrap_or_default();
        assert!(
            said.contains(needle),
            "{what}: {said:?} should name {needle:?}"
        );
    }
    assert_eq!(
        leases_of(&op, AGENT).await.len(),
        before,
        "a refusal wrote a lease"
    );
    assert_eq!(
        leases_of(&op, "spiffe://example.org/agent/other")
            .await
            .len(),
        1,
        "only the other agent's own task"
    );
}

/// A request policy makes wait answers `authorization_pending` with the
/// approval's id; the client polls with it until an operator decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_is_polled_for_like_a_device_grant() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let mut req = start_request("deploy", &[API], &["read:files", "write:files"]);
    req.context = [("environment".to_owned(), "production".to_owned())].into();
    let task = agent.broker().start_task(req).await.unwrap().into_inner();
    let me = svid(&broker, AGENT);
    let form = token_form(&task.task_id, API, "write:files");

    let (status, body) = post(&broker, "/oauth2/token", Some(&me), &form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("authorization_pending")),
        "{body}"
    );
    assert_eq!(body["interval"], 5);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("dev-write-production")
    );
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let poll = format!("{form}&approval_id={id}");
    let (status, body) = post(&broker, "/oauth2/token", Some(&me), &poll).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("authorization_pending")),
        "{body}"
    );
    assert_eq!(body["approval_id"], id.as_str());

    op.admin()
        .approve(pb::DecideApprovalRequest {
            approval_id: id.clone(),
            reason: "change 7".into(),
        })
        .await
        .unwrap();
    let (status, body) = post(&broker, "/oauth2/token", Some(&me), &poll).await;
    assert_eq!(status, 200, "{body}");
    let claims = validate(&broker, body["access_token"].as_str().unwrap(), API).await;
    assert_eq!(claims["scope"], "write:files");
    // Used once.
    let (status, body) = post(&broker, "/oauth2/token", Some(&me), &poll).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // Denied: the operator's reason reaches the client.
    let (_, body) = post(&broker, "/oauth2/token", Some(&me), &form).await;
    let id = body["approval_id"].as_str().unwrap().to_owned();
    op.admin()
        .deny(pb::DecideApprovalRequest {
            approval_id: id.clone(),
            reason: "not during the freeze".into(),
        })
        .await
        .unwrap();
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&me),
        &format!("{form}&approval_id={id}"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("access_denied")),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("not during the freeze"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_revokes_its_own_token_and_no_one_else_s() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = start(&agent).await;
    let me = svid(&broker, AGENT);
    let form = token_form(&task.task_id, API, "read:files");
    let (_, body) = post(&broker, "/oauth2/token", Some(&me), &form).await;
    let token = body["access_token"].as_str().unwrap().to_owned();
    let jti = claims_unverified(&token)["jti"]
        .as_str()
        .unwrap()
        .to_owned();

    // Another agent may not revoke it.
    let other = svid(&broker, "spiffe://example.org/agent/other");
    let (status, body) = post(
        &broker,
        "/oauth2/revoke",
        Some(&other),
        &format!("token={token}"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unauthorized_client")),
        "{body}"
    );
    assert_eq!(lease(&op, &jti).await.state, pb::LeaseState::Active as i32);
    let (status, _) = post(&broker, "/oauth2/revoke", None, &format!("token={token}")).await;
    assert_eq!(status, 401);

    // Its own client may; the lease says so, and introspection agrees.
    let (status, body) = post(
        &broker,
        "/oauth2/revoke",
        Some(&me),
        &format!("token={token}&token_type_hint=access_token"),
    )
    .await;
    assert_eq!((status, &body), (200, &Value::Null));
    let l = lease(&op, &jti).await;
    assert_eq!(l.state, pb::LeaseState::Revoked as i32);
    assert_eq!(
        l.revocation_reason,
        pb::RevocationReason::TokenRevoked as i32
    );
    assert_eq!(l.revoked_by, AGENT);
    // Again, or something that is no token of ours: 200, nothing changes.
    for t in [token.as_str(), "not-a-token", "eyJ.eyJ.x"] {
        let (status, _) = post(&broker, "/oauth2/revoke", Some(&me), &format!("token={t}")).await;
        assert_eq!(status, 200, "{t}");
    }
    let (status, body) = post(
        &broker,
        "/oauth2/revoke",
        Some(&me),
        "token_type_hint=access_token",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    // The rest of the task goes on.
    let (status, _) = post(&broker, "/oauth2/token", Some(&me), &form).await;
    assert_eq!(status, 200);
}

/// A DPoP proof binds the token to the proof's key instead of the client
/// certificate (RFC 9449); a bad proof is `invalid_dpop_proof` naming the
/// check, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_proof_binds_the_token_to_its_key() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = start(&agent).await;
    let me = svid(&broker, AGENT);
    let key = DpopKey::new();
    let url = format!("{}/oauth2/token", broker.issuer());
    let form = token_form(&task.task_id, API, "read:files");
    let send = |proof: String| {
        let (broker, me, form) = (&broker, &me, &form);
        async move {
            let (status, _, body) = https_post_form_with(
                &format!("{}/oauth2/token", broker.http_url()),
                &broker.bundle_pem(),
                Some(me),
                form,
                &[("DPoP", &proof)],
            )
            .await;
            (status, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let (status, body) = send(key.proof("POST", &url, None)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "DPoP");
    let claims = validate(&broker, body["access_token"].as_str().unwrap(), API).await;
    assert_eq!(claims["cnf"], serde_json::json!({"jkt": key.thumbprint()}));

    let before = leases_of(&op, AGENT).await.len();
    let replayed = key.proof("POST", &url, None);
    assert_eq!(send(replayed.clone()).await.0, 200);
    let mut stale = DpopKey::claims("POST", &url, None);
    stale["iat"] = (stale["iat"].as_u64().unwrap() - 600).into();
    let mut wrong_url = DpopKey::claims("POST", &url, None);
    wrong_url["htu"] = "https://elsewhere.example/oauth2/token".into();
    for (proof, needle) in [
        (replayed, "already used"),
        (key.sign(&stale), "stale"),
        (key.sign(&wrong_url), "htu"),
        (key.proof("GET", &url, None), "htm"),
        ("x.y.z".to_owned(), "malformed"),
    ] {
        let (status, body) = send(proof).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_dpop_proof")),
            "{body}"
        );
        assert!(
            body["error_description"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
    assert_eq!(
        leases_of(&op, AGENT).await.len(),
        before + 1,
        "only the good replay's first use"
    );
}

/// Over gRPC an agent binds a token to a DPoP key by sending the key's
/// public JWK (it proves possession later, to the API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_token_binds_to_a_dpop_key_given_as_a_jwk() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    let key = DpopKey::new();
    let mut req = token_request(&task.task_id, API, &["read:files"]);
    req.dpop_jwk = key.jwk().to_string();
    let t = agent.issue_token(req.clone()).await.unwrap();
    assert_eq!(t.token_type, "DPoP");
    let claims = validate(&broker, &t.token, API).await;
    assert_eq!(claims["cnf"], serde_json::json!({"jkt": key.thumbprint()}));

    req.bind_to_client_cert = true;
    assert_status(
        agent.issue_token(req.clone()).await,
        tonic::Code::InvalidArgument,
        "choose one",
    );
    req.bind_to_client_cert = false;
    let mut private = key.jwk().clone();
    private["d"] = "AAAA".into();
    req.dpop_jwk = private.to_string();
    assert_status(
        agent.issue_token(req.clone()).await,
        tonic::Code::InvalidArgument,
        "private key",
    );
    req.dpop_jwk = "{".into();
    assert_status(
        agent.issue_token(req).await,
        tonic::Code::InvalidArgument,
        "not JSON",
    );
}

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

fn exchange_form(subject: &str, resource: &str, scope: &str) -> String {
    format!(
        "grant_type={EXCHANGE}&subject_token={subject}&subject_token_type={ACCESS_TOKEN}\
         &resource={resource}&scope={scope}"
    )
}

/// Each service hop is a reviewable exchange: the token stays the
/// agent's (`sub`), names one more actor each time (`act`), is a lease of
/// the same task, and dies with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_exchange_adds_one_hop_and_dies_with_the_task() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let mut req = start_request("hop", &[API, TOOLS], &["read:files", "write:files"]);
    req.context = [("environment".to_owned(), "staging".to_owned())].into();
    let task = agent.broker().start_task(req).await.unwrap().into_inner();
    let first = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap();
    let files = svid(&broker, "spiffe://example.org/api/files");
    let tools = svid(&broker, "spiffe://example.org/api/tools");

    // The files API calls the tools API on the agent's behalf.
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&files),
        &exchange_form(&first.token, TOOLS, "read:files"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN);
    let second = body["access_token"].as_str().unwrap().to_owned();
    let c = validate(&broker, &second, TOOLS).await;
    assert_eq!(c["sub"], AGENT);
    assert_eq!(c["client_id"], "spiffe://example.org/api/files");
    assert_eq!(
        c["act"],
        serde_json::json!({"sub": "spiffe://example.org/api/files"})
    );
    assert_eq!(c["task_id"], task.task_id.as_str());
    let der = CertificateDer::from_pem_slice(files.cert_pem.as_bytes()).unwrap();
    assert_eq!(
        c["cnf"]["x5t#S256"],
        mayfly_verify::cert_thumbprint(&der).as_str()
    );

    // The tools API, one hop further: `act` nests.
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&tools),
        &exchange_form(&second, API, "read:files"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let third = body["access_token"].as_str().unwrap().to_owned();
    let c3 = validate(&broker, &third, API).await;
    assert_eq!(c3["sub"], AGENT);
    assert_eq!(
        c3["act"],
        serde_json::json!({"sub": "spiffe://example.org/api/tools", "act": {"sub": "spiffe://example.org/api/files"}})
    );

    // Both hops are leases of the task, listed with it.
    let leases = all_leases(
        &op,
        pb::ListLeasesRequest {
            task_id: task.task_id.clone(),
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<&str> = leases.iter().map(|l| l.lease_id.as_str()).collect();
    for t in [&second, &third] {
        let jti = claims_unverified(t)["jti"].as_str().unwrap().to_owned();
        assert!(ids.contains(&jti.as_str()), "{jti} in {ids:?}");
        assert_eq!(lease(&op, &jti).await.kind, pb::LeaseKind::Jwt as i32);
    }

    // A context change policy no longer allows takes the hops, not the
    // agent's own token.
    let changed = agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.task_id.clone(),
            set: [("environment".to_owned(), "production".to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let hops: Vec<String> = [&second, &third]
        .iter()
        .map(|t| claims_unverified(t)["jti"].as_str().unwrap().to_owned())
        .collect();
    let mut revoked = changed.revoked_leases.clone();
    revoked.sort();
    let mut want = hops.clone();
    want.sort();
    assert_eq!(revoked, want);
    assert_eq!(
        lease(&op, &first.lease_id).await.state,
        pb::LeaseState::Active as i32
    );

    // Exchanges in production are refused; back in staging they work, and
    // completing the task ends every hop.
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&files),
        &exchange_form(&first.token, TOOLS, "read:files"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("access_denied")),
        "{body}"
    );
    agent
        .broker()
        .update_task_context(pb::UpdateTaskContextRequest {
            task_id: task.task_id.clone(),
            set: [("environment".to_owned(), "staging".to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
    let (_, body) = post(
        &broker,
        "/oauth2/token",
        Some(&files),
        &exchange_form(&first.token, TOOLS, "read:files"),
    )
    .await;
    let hop = claims_unverified(body["access_token"].as_str().unwrap())["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.complete_task(&task.task_id).await.unwrap();
    assert_eq!(lease(&op, &hop).await.state, pb::LeaseState::Revoked as i32);
    // A subject token that has ended is no grant.
    assert_exchange_refused(
        &broker,
        &files,
        &first.token,
        "invalid_grant",
        "revoked or expired",
    )
    .await;
}

/// An exchange of `subject` for a read token to the tools API, by `who`,
/// is refused with `error`, its description naming `needle`.
async fn assert_exchange_refused(
    broker: &TestBroker,
    who: &Credential,
    subject: &str,
    error: &str,
    needle: &str,
) {
    let (status, body) = post(
        broker,
        "/oauth2/token",
        Some(who),
        &exchange_form(subject, TOOLS, "read:files"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some(error)),
        "{body}"
    );
    let said = body["error_description"].as_str().unwrap();
    assert!(said.contains(needle), "{needle:?} in {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_exchange_names_its_error_and_writes_nothing() {
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = agent
        .broker()
        .start_task(start_request(
            "hop",
            &[API, TOOLS],
            &["read:files", "write:files"],
        ))
        .await
        .unwrap()
        .into_inner();
    let t = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap()
        .token;
    let mut short = token_request(&task.task_id, API, &["read:files"]);
    short.ttl_seconds = 1;
    let expiring = agent.issue_token(short).await.unwrap().token;
    let files = svid(&broker, "spiffe://example.org/api/files");
    let not_a_service = svid(&broker, "spiffe://example.org/agent/other");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let parts: Vec<&str> = t.split('.').collect();
    let forged = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
    let cases: Vec<(&str, &Credential, String, &str, &str)> = vec![
        (
            "outside the envelope",
            &files,
            exchange_form(&t, "https://billing.example.com", "read:files"),
            "invalid_target",
            "billing",
        ),
        (
            "scope outside the envelope",
            &files,
            exchange_form(&t, TOOLS, "admin:files"),
            "invalid_scope",
            "admin:files",
        ),
        (
            "a write hop",
            &files,
            exchange_form(&t, TOOLS, "write:files"),
            "access_denied",
            "no policy permits",
        ),
        (
            "a caller that did not receive the token",
            &not_a_service,
            exchange_form(&t, TOOLS, "read:files"),
            "invalid_grant",
            "not a resource server",
        ),
        (
            "an expired subject token",
            &files,
            exchange_form(&expiring, TOOLS, "read:files"),
            "invalid_grant",
            "expired",
        ),
        (
            "a forged subject token",
            &files,
            exchange_form(&forged, TOOLS, "read:files"),
            "invalid_grant",
            "not a token this broker issued",
        ),
        (
            "garbage",
            &files,
            exchange_form("x.y.z", TOOLS, "read:files"),
            "invalid_grant",
            "not a token",
        ),
        (
            "no subject_token_type",
            &files,
            format!("grant_type={EXCHANGE}&subject_token={t}&resource={TOOLS}"),
            "invalid_request",
            "subject_token_type",
        ),
        (
            "another subject_token_type",
            &files,
            exchange_form(&t, TOOLS, "read:files").replace("access_token&", "id_token&"),
            "invalid_request",
            "id_token",
        ),
        (
            "an actor_token",
            &files,
            format!(
                "{}&actor_token=x&actor_token_type={ACCESS_TOKEN}",
                exchange_form(&t, TOOLS, "read:files")
            ),
            "invalid_request",
            "actor_token",
        ),
    ];
    let before = all_leases(
        &op,
        pb::ListLeasesRequest {
            task_id: task.task_id.clone(),
            ..Default::default()
        },
    )
    .await
    .len();
    for (what, who, form, error, needle) in cases {
        let (status, body) = post(&broker, "/oauth2/token", Some(who), &form).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(error)),
            "{what}: {body}"
        );
        let said = body["error_description"].as_str().unwrap_or_default();
        assert!(
            said.contains(needle),
            "{what}: {said:?} should name {needle:?}"
        );
    }
    let after = all_leases(
        &op,
        pb::ListLeasesRequest {
            task_id: task.task_id.clone(),
            ..Default::default()
        },
    )
    .await
    .len();
    assert_eq!(after, before, "a refused exchange wrote a lease");
}

/// Only a token's recipient may exchange it: under a policy that permits
/// everything, the agent that holds it, another agent, and a resource
/// server of another audience are each refused before policy is asked,
/// with nothing written but the refusal's record; the audience's own
/// resource server gets its hop, and policy sees which one it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_subject_token_s_recipient_may_exchange_it() {
    let broker = TestBroker::start_with(|c| {
        mayfly_testkit::use_policies(
            c,
            "@id(\"anything\")\npermit (principal, action, resource);\n\n\
             @id(\"only-api-hops\")\nforbid (principal, action == Mayfly::Action::\"exchange_token\", resource)\n\
             unless { context.resource_server == \"api\" };\n",
        )
    })
    .await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let task = agent
        .broker()
        .start_task(start_request("hop", &[API, TOOLS], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    let t = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap()
        .token;
    let holder = svid(&broker, AGENT);
    let other_agent = svid(&broker, "spiffe://example.org/agent/other");
    let other_api = svid(&broker, "spiffe://example.org/api/tools");
    let count = || async { task_leases(&op, &task.task_id).await.len() };
    let before = count().await;
    // The agent holding it, another agent, a resource server of another
    // audience.
    for (who, name) in [
        (&holder, AGENT),
        (&other_agent, "spiffe://example.org/agent/other"),
        (&other_api, "spiffe://example.org/api/tools"),
    ] {
        let needle = format!("issued for {API}, and {name} is not a resource server");
        assert_exchange_refused(&broker, who, &t, "invalid_grant", &needle).await;
    }
    assert_eq!(count().await, before, "a refused exchange wrote a lease");
    let refusals: Vec<Value> = audit_trail(&op)
        .await
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "exchange_denied")
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    let jti = claims_unverified(&t)["jti"].as_str().unwrap().to_owned();
    for r in &refusals {
        assert_eq!(r["task_id"], task.task_id.as_str());
        assert_eq!(r["subject_lease_id"], jti.as_str());
        assert_eq!(r["decision"], "deny");
    }

    // The audience's own resource server (`api`, as policy requires).
    let files = svid(&broker, "spiffe://example.org/api/files");
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&files),
        &exchange_form(&t, TOOLS, "read:files"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count().await, before + 1);
}

/// Revoking a service ends every token it holds as the actor (its
/// exchanged hops, under tasks of agents that stay untouched): the call
/// counts them, introspection calls each inactive, and each reaches the
/// feed. Locked, the service cannot exchange again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_service_ends_the_hops_it_exchanged_for() {
    const FILES: &str = "spiffe://example.org/api/files";
    let broker = TestBroker::start().await;
    let (agent, op) = (broker.agent().await, broker.operator().await);
    let files = svid(&broker, FILES);
    let task = agent
        .broker()
        .start_task(start_request("hop", &[API, TOOLS], &["read:files"]))
        .await
        .unwrap()
        .into_inner();
    let own = agent
        .issue_token(token_request(&task.task_id, API, &["read:files"]))
        .await
        .unwrap();
    let mut hops = Vec::new();
    for _ in 0..2 {
        let (status, body) = post(
            &broker,
            "/oauth2/token",
            Some(&files),
            &exchange_form(&own.token, TOOLS, "read:files"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        hops.push(body["access_token"].as_str().unwrap().to_owned());
    }
    let ids: Vec<String> = hops
        .iter()
        .map(|t| claims_unverified(t)["jti"].as_str().unwrap().to_owned())
        .collect();
    let tools = svid(&broker, "spiffe://example.org/api/tools");
    let introspect = |token: String| {
        let (broker, tools) = (&broker, &tools);
        async move {
            post(
                broker,
                "/introspect",
                Some(tools),
                &format!("token={token}"),
            )
            .await
        }
    };
    for t in &hops {
        assert_eq!(introspect(t.clone()).await.1["active"], true);
    }
    let r = op
        .admin()
        .revoke_agent(pb::RevokeAgentRequest {
            agent_id: FILES.into(),
            note: "compromised".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = r.revoked_leases.clone();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "the service's hops, and nothing of the agent's");
    for t in &hops {
        assert_eq!(introspect(t.clone()).await.1["active"], false);
    }
    assert_eq!(
        lease(&op, &own.lease_id).await.state,
        pb::LeaseState::Active as i32
    );
    // Nothing else was revoked: the feed from its start holds just them.
    let mut s = feed(&broker).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !e.heartbeat {
            assert_eq!(e.reason, pb::RevocationReason::AgentRevoked as i32);
            seen.push(e.lease_id);
        }
    }
    seen.sort();
    assert_eq!(seen, want);

    // Locked, it cannot exchange again (and says so), and nothing is
    // written.
    op.admin()
        .lock_agent(pb::LockAgentRequest {
            agent_id: FILES.into(),
            reason: "compromised".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap();
    let before = task_leases(&op, &task.task_id).await.len();
    assert_exchange_refused(&broker, &files, &own.token, "access_denied", "locked").await;
    assert_eq!(task_leases(&op, &task.task_id).await.len(), before);
}

/// The revocation feed from its start, as a validator follows it.
async fn feed(broker: &TestBroker) -> tonic::Streaming<pb::RevocationEvent> {
    let watcher = broker
        .client_with(&svid(broker, "spiffe://example.org/api/validator"))
        .await
        .unwrap();
    pb::revocations_client::RevocationsClient::new(watcher.channel())
        .watch_revocations(pb::WatchRequest { from_cursor: 0 })
        .await
        .unwrap()
        .into_inner()
}

/// A client that hands its token to something that can check no binding
/// (a stock MCP client) asks for a bearer token; anything else is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_is_asked_for_by_name() {
    let broker = TestBroker::start().await;
    let agent = broker.agent().await;
    let task = start(&agent).await;
    let me = svid(&broker, AGENT);
    let form = token_form(&task.task_id, API, "read:files");
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&me),
        &format!("{form}&token_binding=none"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    let claims = validate(&broker, body["access_token"].as_str().unwrap(), API).await;
    assert!(claims.get("cnf").is_none(), "{claims}");
    let (status, body) = post(
        &broker,
        "/oauth2/token",
        Some(&me),
        &format!("{form}&token_binding=sometimes"),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    let key = DpopKey::new();
    let (status, _, body) = https_post_form_with(
        &format!("{}/oauth2/token", broker.http_url()),
        &broker.bundle_pem(),
        Some(&me),
        &format!("{form}&token_binding=none"),
        &[(
            "DPoP",
            &key.proof("POST", &format!("{}/oauth2/token", broker.issuer()), None),
        )],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("token_binding=none with a DPoP proof"),
        "{body}"
    );
}
