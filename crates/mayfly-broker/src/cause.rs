//! [`Cause`]: what went wrong underneath a store, trail or request error,
//! said for people and kept for code. Its message is what logs and the
//! operator see; the error it came from stays reachable through
//! [`source`](std::error::Error::source) (a Redis or redb error, an I/O
//! error, a decoding error), so callers can tell a timeout from a refusal
//! without parsing text. Shared, so the errors holding it stay `Clone`.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// A message, and the error under it if there is one.
#[derive(Clone)]
pub struct Cause {
    /// What went wrong, with the source's own words where there is one.
    message: String,
    /// The error this came from.
    source: Option<Arc<dyn Error + Send + Sync + 'static>>,
}

impl Cause {
    /// A cause with no error under it (a broken invariant, an unexpected
    /// reply).
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// `error` itself, in its own words.
    pub fn of(error: impl Error + Send + Sync + 'static) -> Self {
        Self {
            message: error.to_string(),
            source: Some(Arc::new(error)),
        }
    }

    /// `context: error`, keeping `error` as the source.
    pub fn context(context: impl fmt::Display, error: impl Error + Send + Sync + 'static) -> Self {
        Self {
            message: format!("{context}: {error}"),
            source: Some(Arc::new(error)),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Cause");
        d.field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_error_it_came_from() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let c = Cause::context("/var/lib/mayfly/leases.redb", io);
        assert_eq!(c.to_string(), "/var/lib/mayfly/leases.redb: denied");
        let source = c.source().expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the io error");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        let copy = c.clone();
        assert!(copy.source().is_some());
        assert!(Cause::msg("empty reply").source().is_none());
    }
}
