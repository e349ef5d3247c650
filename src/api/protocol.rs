//! Request bodies of Docker's volume plugin protocol, decoded leniently where dockerd
//! varies (unknown fields, `"Opts": null`, trailing newline) and strictly where sloppy
//! input could hide a mistake (duplicate option keys, non-string values).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Deserialize)]
pub struct NameRequest {
    #[serde(rename = "Name")]
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    #[serde(rename = "Name")]
    pub name: String,
    /// `null` when the user gave no `-o` options.
    #[serde(rename = "Opts", default)]
    pub opts: Option<Opts>,
}

#[derive(Debug, Deserialize)]
pub struct MountRequest {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "ID")]
    pub id: String,
}

/// Create options: a JSON object of strings with no key twice.
#[derive(Debug, Default)]
pub struct Opts(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Opts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct OptsVisitor;
        impl<'de> Visitor<'de> for OptsVisitor {
            type Value = Opts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of string options")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Opts, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<String, String>()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format_args!(
                            "option {k:?} is given twice; give each option once"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Opts(out))
            }
        }
        d.deserialize_map(OptsVisitor)
    }
}

/// Decodes a request body, turning every failure into an error a person can act on.
pub fn decode<'a, T: Deserialize<'a>>(endpoint: &str, body: &'a [u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::BadRequest(format!(
            "{endpoint} needs a JSON body like {{\"Name\": \"myvolume\"}}; the body was empty"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("{endpoint}: malformed request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerd_shaped_bodies_decode() {
        let c: CreateRequest = decode("Create", b"{\"Name\":\"v\",\"Opts\":null}\n").unwrap();
        assert!(c.opts.is_none());
        let c: CreateRequest = decode(
            "Create",
            b"{\"Name\":\"v\",\"Opts\":{\"size\":\"1G\"},\"Extra\":1}\n",
        )
        .unwrap();
        assert_eq!(c.opts.unwrap().0["size"], "1G");
        let m: MountRequest = decode("Mount", b"{\"Name\":\"v\",\"ID\":\"abc\"}\n").unwrap();
        assert_eq!(m.id, "abc");
    }

    #[test]
    fn sloppy_bodies_are_refused_with_reasons() {
        let dup = decode::<CreateRequest>(
            "Create",
            b"{\"Name\":\"v\",\"Opts\":{\"a\":\"1\",\"a\":\"2\"}}",
        );
        assert!(dup.unwrap_err().to_string().contains("given twice"));
        let num = decode::<CreateRequest>("Create", b"{\"Name\":\"v\",\"Opts\":{\"size\":10}}");
        assert!(num.unwrap_err().to_string().contains("malformed"));
        let empty = decode::<NameRequest>("Get", b"\n");
        assert!(empty.unwrap_err().to_string().contains("empty"));
        let wrong = decode::<NameRequest>("Get", b"{\"Name\":5}");
        assert!(wrong.is_err());
        let missing = decode::<NameRequest>("Get", b"{}");
        assert!(missing.unwrap_err().to_string().contains("Name"));
    }
}
