//! Whether a "not the lock owner" answer means this exporter is fenced. Fencing is
//! blocklisting (or another client holding the lock): librbd also answers "not the
//! owner" for a moment while it re-registers its watch after a reconnect and updates
//! the lock's cookie, and that must not end a healthy mapping for good.

use crate::ceph::images::same_client;
use crate::ceph::sys;

/// What the owner check and the lock's holders say about this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// librbd says the lock is ours.
    Owner,
    /// Not the owner right now, but nothing shows that anyone else is: the lock is
    /// momentarily unowned or held by this very client (a new cookie after a
    /// reconnect), or the holders could not be read. Check again later.
    Transient(String),
    /// Definitely lost: this client is blocklisted, or another client holds the lock.
    Fenced(String),
}

/// Decides from the owner check (`rbd_is_exclusive_lock_owner`), the managed lock's
/// owners as the image header says now (`rbd_lock_get_owners`, read only when the
/// owner check is not conclusive; the handle's own lock list is a cache) and this
/// client's address.
///
/// ESHUTDOWN from either call is a blocklisted client, which is final. Otherwise only
/// a managed-lock holder at another address confirms the loss.
pub fn judge(
    owner: sys::Result<bool>,
    owners: impl FnOnce() -> sys::Result<Vec<String>>,
    ours: &str,
) -> Verdict {
    let shutdown =
        |what: &str| Verdict::Fenced(format!("{what}: this client is blocklisted (ESHUTDOWN)"));
    let owner_said = match owner {
        Ok(true) => return Verdict::Owner,
        Err(e) if e.0 == libc::ESHUTDOWN => return shutdown("owner check"),
        Ok(false) => "the owner check says this client does not hold the lock".to_string(),
        Err(e) => format!("the owner check failed ({})", e.describe()),
    };
    let holders = match owners() {
        Err(e) if e.0 == libc::ESHUTDOWN => return shutdown("reading the lock owner"),
        // EBUSY: an advisory lock is in the way; neither says who owns the managed lock.
        Err(e) => {
            return Verdict::Transient(format!(
                "{owner_said}, and the lock owner could not be read ({})",
                e.describe()
            ))
        }
        Ok(h) => h,
    };
    if let Some(other) = holders.iter().find(|a| !same_client(a, ours)) {
        return Verdict::Fenced(format!("{owner_said}, and {other} now holds it"));
    }
    if holders.is_empty() {
        Verdict::Transient(format!("{owner_said}; nobody holds the lock right now"))
    } else {
        Verdict::Transient(format!(
            "{owner_said}, but the image header names this client as the owner: librbd is \
             re-taking it (new cookie) after a reconnect"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceph::sys::Errno;

    const OURS: &str = "10.0.0.2:0/1001";

    fn at(addr: &str) -> sys::Result<Vec<String>> {
        Ok(vec![addr.to_string()])
    }

    fn never() -> sys::Result<Vec<String>> {
        panic!("the holders must not be read when the owner check is conclusive")
    }

    fn is_transient(v: &Verdict) -> bool {
        matches!(v, Verdict::Transient(_))
    }

    #[test]
    fn the_owner_is_the_owner_without_reading_the_holders() {
        assert_eq!(judge(Ok(true), never, OURS), Verdict::Owner);
    }

    #[test]
    fn a_blocklisted_client_is_fenced_whatever_else_is_seen() {
        let v = judge(Err(Errno(libc::ESHUTDOWN)), never, OURS);
        assert!(
            matches!(&v, Verdict::Fenced(r) if r.contains("blocklisted")),
            "{v:?}"
        );
        let v = judge(Ok(false), || Err(Errno(libc::ESHUTDOWN)), OURS);
        assert!(
            matches!(&v, Verdict::Fenced(r) if r.contains("blocklisted")),
            "{v:?}"
        );
    }

    #[test]
    fn another_holder_confirms_the_loss() {
        let v = judge(Ok(false), || at("10.0.0.3:0/77"), OURS);
        assert!(
            matches!(&v, Verdict::Fenced(r) if r.contains("10.0.0.3:0/77")),
            "{v:?}"
        );
        // Even when the owner check itself failed.
        let v = judge(Err(Errno(libc::EIO)), || at("10.0.0.3:0/77"), OURS);
        assert!(matches!(v, Verdict::Fenced(_)), "{v:?}");
    }

    #[test]
    fn an_unowned_lock_is_not_fencing() {
        let v = judge(Ok(false), || Ok(vec![]), OURS);
        assert!(
            matches!(&v, Verdict::Transient(r) if r.contains("nobody")),
            "{v:?}"
        );
    }

    #[test]
    fn our_own_lock_under_a_new_cookie_is_not_fencing() {
        // The address may come back spelled with its protocol prefix.
        let v = judge(Ok(false), || at(&format!("v2:{OURS}")), OURS);
        assert!(
            matches!(&v, Verdict::Transient(r) if r.contains("re-taking")),
            "{v:?}"
        );
        let v = judge(Err(Errno(libc::EIO)), || at(OURS), OURS);
        assert!(is_transient(&v), "{v:?}");
    }

    #[test]
    fn an_unreadable_owner_confirms_nothing() {
        let v = judge(Ok(false), || Err(Errno(libc::ETIMEDOUT)), OURS);
        assert!(is_transient(&v), "{v:?}");
        // EBUSY: an advisory lock is in the way of the query.
        let v = judge(Ok(false), || Err(Errno(libc::EBUSY)), OURS);
        assert!(is_transient(&v), "{v:?}");
    }
}
