//! RFC 9728 protected-resource metadata: how a client that was refused
//! finds the authorization server to get a token from (the MCP
//! authorization flow starts here). [`layer::VerifyLayer`](crate::layer::VerifyLayer)
//! serves it at the resource's well-known address and names it in every
//! 401's `WWW-Authenticate: Bearer resource_metadata="…"`.

use serde_json::{Value, json};

/// What a protected resource says about itself.
#[derive(Debug, Clone)]
pub struct ResourceMetadata {
    /// The resource identifier: the audience tokens for it carry, an
    /// `https` URL.
    pub resource: String,
    /// Issuers a client may get tokens from (the broker's).
    pub authorization_servers: Vec<String>,
    /// Scopes the resource understands, if it wants to say.
    pub scopes_supported: Vec<String>,
    /// A name for people.
    pub resource_name: Option<String>,
}

impl ResourceMetadata {
    /// The metadata of `resource`, served by `authorization_server`.
    pub fn new(resource: &str, authorization_server: &str) -> Self {
        Self {
            resource: resource.to_owned(),
            authorization_servers: vec![authorization_server.trim_end_matches('/').to_owned()],
            scopes_supported: Vec::new(),
            resource_name: None,
        }
    }

    /// The same, listing the scopes the resource understands.
    pub fn with_scopes(mut self, scopes: &[&str]) -> Self {
        self.scopes_supported = scopes.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The path of the document on the resource's host (RFC 9728 §3.1:
    /// the well-known prefix, then the resource's own path, if any).
    /// `None` when the resource is not an `https` URL.
    pub fn well_known_path(&self) -> Option<String> {
        let rest = self.resource.strip_prefix("https://")?;
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        let path = path.split(['?', '#']).next().unwrap_or("");
        Some(format!(
            "/.well-known/oauth-protected-resource{}",
            path.trim_end_matches('/')
        ))
    }

    /// The document's URL, for `resource_metadata`.
    pub fn url(&self) -> Option<String> {
        let path = self.well_known_path()?;
        let rest = self.resource.strip_prefix("https://")?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
        Some(format!("https://{host}{path}"))
    }

    /// The JSON document.
    pub fn document(&self) -> Value {
        // Members in name order, whatever serde_json's `preserve_order`
        // (another crate of the build may turn it on).
        let mut doc = std::collections::BTreeMap::new();
        doc.insert("resource", json!(self.resource));
        doc.insert("authorization_servers", json!(self.authorization_servers));
        doc.insert("bearer_methods_supported", json!(["header"]));
        if !self.scopes_supported.is_empty() {
            doc.insert("scopes_supported", json!(self.scopes_supported));
        }
        if let Some(n) = &self.resource_name {
            doc.insert("resource_name", json!(n));
        }
        json!(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lives_under_the_resource_host_and_path() {
        let m = ResourceMetadata::new("https://api.example.com", "https://broker:8711/");
        assert_eq!(
            m.url().as_deref(),
            Some("https://api.example.com/.well-known/oauth-protected-resource")
        );
        assert_eq!(
            m.document()["authorization_servers"][0],
            "https://broker:8711"
        );
        let m = ResourceMetadata::new("https://tools.example.com:8443/mcp/", "https://b");
        assert_eq!(
            m.url().as_deref(),
            Some("https://tools.example.com:8443/.well-known/oauth-protected-resource/mcp")
        );
        assert!(ResourceMetadata::new("api", "https://b").url().is_none());
        let doc = m.with_scopes(&["read:files"]).document();
        assert_eq!(doc["scopes_supported"], json!(["read:files"]));
        assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
    }
}
