//! One macro for the string newtypes that carry outside input (`TaskId`,
//! `LeaseId`, `Audience`, `Scope`): a private field, one fallible
//! constructor that every other path (`FromStr`, serde) goes through, and a
//! `Display` that round-trips.

/// `validated_string!(doc, Name, check_fn, ErrorType)`: `check_fn(&str) ->
/// Result<(), ErrorType>` decides validity.
macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $check:path, $err:ty) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates input from outside.
            pub fn new(s: &str) -> Result<Self, $err> {
                $check(s)?;
                Ok(Self(s.to_owned()))
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "({:?})"), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = $err;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use validated_string;
