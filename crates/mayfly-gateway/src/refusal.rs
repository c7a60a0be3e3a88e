//! Why a request was not forwarded, and how each protocol is told: an MCP
//! client gets a JSON-RPC error (the transport's HTTP status when the
//! request never reached JSON-RPC), an HTTP API client an RFC 9457
//! problem document. Neither ever holds a secret: refusals are built from
//! names, ids and the broker's own messages.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

/// JSON-RPC 2.0 error codes: the spec's, MCP's, then the gateway's own in
/// the implementation-defined server range (-32000 to -32099), clear of
/// MCP's (-32002 resource not found, -32042 URL elicitation required) and
/// of the band the MCP SDKs keep for themselves (-32000 to -32019).
pub mod code {
    /// Not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Not one JSON-RPC request object.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Bad tool name or arguments.
    pub const INVALID_PARAMS: i64 = -32602;
    /// Policy, the task or the token refused the call.
    pub const REFUSED: i64 = -32060;
    /// The call waits for an operator's approval.
    pub const APPROVAL_PENDING: i64 = -32061;
    /// The broker or the upstream could not be reached.
    pub const UNAVAILABLE: i64 = -32062;
    /// MCP's URL elicitation required (2025-11-25): the approval's page.
    pub const URL_ELICITATION_REQUIRED: i64 = -32042;
}

/// A refusal: what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status of a problem document, or of an MCP request that
    /// is refused before JSON-RPC.
    pub status: StatusCode,
    /// A stable name (`denied`, `approval_pending`, `invalid_arguments`,
    /// `upstream_unreachable`, …), as the broker's `mayfly-error`.
    pub error: String,
    /// For people.
    pub detail: String,
    /// The JSON-RPC error code.
    pub rpc_code: i64,
    /// The policy that refused, when one did.
    pub policy_id: Option<String>,
    /// The approval to wait for, or that was refused.
    pub approval_id: Option<String>,
    /// Where an operator decides that approval, for an MCP client that
    /// takes URL elicitations.
    pub elicitation_url: Option<String>,
}

impl Refusal {
    /// A refusal with `status`, name and detail.
    pub fn new(status: StatusCode, error: &str, rpc_code: i64, detail: impl Into<String>) -> Self {
        Self {
            status,
            error: error.to_owned(),
            detail: detail.into(),
            rpc_code,
            policy_id: None,
            approval_id: None,
            elicitation_url: None,
        }
    }

    /// 400: the request is malformed (`error` names how).
    pub fn bad_request(error: &str, rpc_code: i64, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, rpc_code, detail)
    }

    /// 403: refused.
    pub fn forbidden(error: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, error, code::REFUSED, detail)
    }

    /// 503: the gateway cannot decide now.
    pub fn unavailable(error: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            error,
            code::UNAVAILABLE,
            detail,
        )
    }

    /// The JSON-RPC `error` member.
    pub fn rpc_error(&self) -> Value {
        let mut data = json!({ "mayfly_error": self.error });
        if let Some(p) = &self.policy_id {
            data["policy_id"] = json!(p);
        }
        if let Some(a) = &self.approval_id {
            data["approval_id"] = json!(a);
        }
        if let (Some(url), Some(id)) = (&self.elicitation_url, &self.approval_id) {
            // MCP 2025-11-25 URLElicitationRequiredError.
            data["elicitations"] = json!([{
                "mode": "url",
                "elicitationId": id,
                "url": url,
                "message": self.detail,
            }]);
        }
        json!({ "code": self.rpc_code, "message": self.detail, "data": data })
    }

    /// A JSON-RPC error response to request `id`, as HTTP 200: the
    /// transport worked, the call was refused.
    pub fn rpc_response(&self, id: &Value) -> Response<Full<Bytes>> {
        let body = json!({ "jsonrpc": "2.0", "id": id, "error": self.rpc_error() });
        json_response(StatusCode::OK, "application/json", &body)
    }

    /// An RFC 9457 problem document with the refusal's status.
    pub fn problem(&self) -> Response<Full<Bytes>> {
        let mut body = json!({
            "type": format!("urn:mayfly:error:{}", self.error),
            "title": title(self.status),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "mayfly_error": self.error,
        });
        if let Some(p) = &self.policy_id {
            body["policy_id"] = json!(p);
        }
        if let Some(a) = &self.approval_id {
            body["approval_id"] = json!(a);
        }
        let mut resp = json_response(self.status, "application/problem+json", &body);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Refused")
}

/// `body` as JSON with `status` and `content_type`.
pub fn json_response(
    status: StatusCode,
    content_type: &'static str,
    body: &Value,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_names_the_error_and_the_approval() {
        let mut r = Refusal::forbidden("approval_pending", "waits for an operator");
        r.approval_id = Some("apr_1".into());
        let resp = r.problem();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let e = r.rpc_error();
        assert_eq!(e["code"], code::REFUSED);
        assert_eq!(e["data"]["approval_id"], "apr_1");
        assert_eq!(e["data"]["mayfly_error"], "approval_pending");
    }
}
