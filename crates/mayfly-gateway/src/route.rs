//! HTTP APIs: each configured route (`POST /v1/payments/{id}`) is a tool,
//! and a request's path parameters, query and JSON body are its
//! arguments. A request that matches no route is refused, never
//! forwarded; what is forwarded is rebuilt from what was decided (the
//! query re-encoded, the body in canonical form).

use http::Method;
use mayfly_core::{ArgumentLimits, Arguments, Tool, canonical_json};
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value};

use crate::config::RouteConfig;
use crate::refusal::{Refusal, code};

/// One route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its method.
    pub method: Method,
    /// Its template, as policy sees it (`context.route`).
    pub template: String,
    /// The tool it is.
    pub tool: Tool,
}

/// An upstream's routes.
#[derive(Debug, Clone)]
pub struct Routes {
    router: matchit::Router<Vec<Route>>,
}

/// A request matched to its route, with its arguments.
#[derive(Debug)]
pub struct Matched<'a> {
    /// The route.
    pub route: &'a Route,
    /// Parameters, query and body fields.
    pub arguments: Arguments,
    /// The query to forward (re-encoded), if any.
    pub query: Option<String>,
    /// The body to forward (the JSON object in canonical form), if any.
    pub body: Option<String>,
}

impl Routes {
    /// The routes of `upstream`.
    pub fn new(upstream: &str, routes: &[RouteConfig]) -> Result<Self, String> {
        let mut by_template: Vec<(String, Vec<Route>)> = Vec::new();
        for r in routes {
            let route = Route {
                method: Method::from_bytes(r.method.as_bytes())
                    .map_err(|_| format!("{:?} is not a method", r.method))?,
                template: r.path.clone(),
                tool: Tool::new(upstream, &r.tool).map_err(|e| e.to_string())?,
            };
            match by_template.iter_mut().find(|(t, _)| *t == r.path) {
                Some((_, v)) => v.push(route),
                None => by_template.push((r.path.clone(), vec![route])),
            }
        }
        let mut router = matchit::Router::new();
        for (template, routes) in by_template {
            router
                .insert(template.clone(), routes)
                .map_err(|e| format!("route {template}: {e}"))?;
        }
        Ok(Self { router })
    }

    /// The route of `method` `path` (the part under the upstream's own
    /// path), with the arguments of `query` and `body`.
    pub fn matched(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Matched<'_>, Refusal> {
        check_path(path)?;
        let found = self.router.at(path).map_err(|_| {
            Refusal::new(
                http::StatusCode::NOT_FOUND,
                "no_route",
                code::INVALID_REQUEST,
                format!("{path} is not a route of this upstream"),
            )
        })?;
        let route = found
            .value
            .iter()
            .find(|r| r.method == *method)
            .ok_or_else(|| {
                Refusal::new(
                    http::StatusCode::METHOD_NOT_ALLOWED,
                    "no_route",
                    code::INVALID_REQUEST,
                    format!("{method} {path} is not a route of this upstream"),
                )
            })?;
        let mut args = Map::new();
        for (name, raw) in found.params.iter() {
            let value = percent_decode_str(raw)
                .decode_utf8()
                .ok()
                .filter(|v| !v.contains(['/', '\\']) && !v.chars().any(char::is_control))
                .ok_or_else(|| bad(format!("path parameter {name} is not a plain segment")))?;
            args.insert(name.to_owned(), Value::String(value.into_owned()));
        }
        let query = match query.filter(|q| !q.is_empty()) {
            None => None,
            Some(q) => {
                let mut out = form_urlencoded::Serializer::new(String::new());
                for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                    if k.chars().chain(v.chars()).any(char::is_control) {
                        return Err(bad(format!(
                            "query parameter {k:?} holds a control character"
                        )));
                    }
                    if args
                        .insert(k.to_string(), Value::String(v.to_string()))
                        .is_some()
                    {
                        return Err(bad(format!("{k:?} is given twice (path, query)")));
                    }
                    out.append_pair(&k, &v);
                }
                Some(out.finish())
            }
        };
        let body = if body.is_empty() {
            None
        } else {
            let text = std::str::from_utf8(body).map_err(|_| bad("body is not UTF-8".into()))?;
            let fields = Arguments::parse(text, &ArgumentLimits::default()).map_err(|e| {
                bad(format!(
                    "body: {}",
                    e.to_string().replacen("arguments", "the body", 1)
                ))
            })?;
            for (k, v) in fields.value() {
                if args.insert(k.clone(), v.clone()).is_some() {
                    return Err(bad(format!(
                        "{k:?} is given twice (path or query, and body)"
                    )));
                }
            }
            Some(fields.canonical().to_owned())
        };
        let arguments = Arguments::parse(
            &canonical_json(&Value::Object(args)),
            &ArgumentLimits::default(),
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(Matched {
            route,
            arguments,
            query,
            body,
        })
    }
}

fn bad(detail: String) -> Refusal {
    Refusal::bad_request("invalid_arguments", code::INVALID_PARAMS, detail)
}

/// Refuses paths an upstream might read differently from the gateway:
/// dot segments, empty segments, encoded slashes and backslashes.
fn check_path(path: &str) -> Result<(), Refusal> {
    let lower = path.to_ascii_lowercase();
    let odd = !path.starts_with('/')
        || path.contains("//")
        || path.contains('\\')
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%2e")
        || path.split('/').any(|s| s == "." || s == "..");
    if odd {
        return Err(Refusal::bad_request(
            "invalid_path",
            code::INVALID_REQUEST,
            "the path holds dot or empty segments, or an encoded slash",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        Routes::new(
            "payments",
            &[
                RouteConfig {
                    method: "POST".into(),
                    path: "/v1/payments/{id}".into(),
                    tool: "pay".into(),
                },
                RouteConfig {
                    method: "GET".into(),
                    path: "/v1/payments/{id}".into(),
                    tool: "get_payment".into(),
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn parameters_query_and_body_are_the_arguments() {
        let routes = routes();
        let m = routes
            .matched(
                &Method::POST,
                "/v1/payments/inv%207",
                Some("note=a+b"),
                br#"{"amount": 5}"#,
            )
            .unwrap();
        assert_eq!(m.route.tool.to_string(), "payments/pay");
        assert_eq!(m.route.template, "/v1/payments/{id}");
        assert_eq!(
            m.arguments.canonical(),
            r#"{"amount":5,"id":"inv 7","note":"a b"}"#
        );
        assert_eq!(m.body.as_deref(), Some(r#"{"amount":5}"#));
        assert_eq!(m.query.as_deref(), Some("note=a+b"));
        let get = routes
            .matched(&Method::GET, "/v1/payments/7", None, b"")
            .unwrap();
        assert_eq!(get.route.tool.name(), "get_payment");
    }

    #[test]
    fn what_matches_no_route_or_smuggles_is_refused() {
        let routes = routes();
        let refused = |method: Method, path: &str, query: Option<&str>, body: &[u8]| {
            routes.matched(&method, path, query, body).unwrap_err()
        };
        assert_eq!(
            refused(Method::DELETE, "/v1/payments/7", None, b"").status,
            http::StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            refused(Method::POST, "/v1/refunds/7", None, b"").status,
            http::StatusCode::NOT_FOUND
        );
        for path in [
            "/v1/payments/..%2Fadmin",
            "/v1/payments/%2e%2e",
            "/v1//payments/7",
            "/v1/payments/a\\b",
        ] {
            assert_eq!(refused(Method::POST, path, None, b"").error, "invalid_path");
        }
        // An argument given twice, so that the upstream might read the
        // other one.
        let twice = refused(Method::POST, "/v1/payments/7", Some("id=8"), b"");
        assert!(twice.detail.contains("twice"), "{}", twice.detail);
        let twice = refused(Method::POST, "/v1/payments/7", None, br#"{"id":"8"}"#);
        assert!(twice.detail.contains("twice"), "{}", twice.detail);
        let dup = refused(
            Method::POST,
            "/v1/payments/7",
            None,
            br#"{"amount":1,"amount":1000}"#,
        );
        assert!(dup.detail.contains("amount"), "{}", dup.detail);
        assert_eq!(
            refused(Method::POST, "/v1/payments/7", None, b"[1]").error,
            "invalid_arguments"
        );
    }
}
