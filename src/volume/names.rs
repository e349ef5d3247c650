//! Volume name validation. Docker does not validate plugin volume names on Linux, and
//! names become RBD image names and path components, so the rule is strict: ASCII
//! letters, digits, `_ . -`, starting with a letter or digit, at most 95 characters.

use crate::error::{Error, Result};

pub const MAX_NAME_LEN: usize = 95;

pub fn validate(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("the name is empty".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "it is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ))
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        Some("it must start with a letter or a digit".to_string())
    } else if name.contains("..") {
        Some("it must not contain \"..\"".to_string())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
            .map(|c| format!("it contains {c:?}; use only letters, digits, '_', '.' and '-'"))
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidName {
            name: name.to_string(),
            reason,
        }),
    }
}

/// Pool names follow the same alphabet (they become path components of mountpoints).
pub fn validate_pool(pool: &str) -> std::result::Result<(), String> {
    if pool.is_empty()
        || pool.len() > 100
        || pool.starts_with('.')
        || !pool
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err("use a pool name made of letters, digits, '_', '.' and '-'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_and_docker_generated_names_are_accepted() {
        for ok in [
            "pg-data",
            "a",
            "db_1.data",
            "0cc175b9c0f1b6a831c399e269772661cc175b9c0f1b6a831c399e269772661a",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            validate(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn names_that_could_escape_or_confuse_are_refused() {
        for bad in [
            "",
            "a/b",
            "..",
            "a..b",
            "../etc",
            ".hidden",
            "-x",
            "a b",
            "a\0b",
            "pool@snap",
            "é",
            "名前",
            "a\nb",
            &"x".repeat(MAX_NAME_LEN + 1),
            &"y".repeat(300),
        ] {
            assert!(validate(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_error_says_what_is_allowed() {
        let msg = validate("a/b").unwrap_err().to_string();
        assert!(msg.contains("letters, digits"), "{msg}");
    }
}
