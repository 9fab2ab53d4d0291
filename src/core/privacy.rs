//! Privacy rules (seed 004): who may see a user's status and `last_seen`.
//!
//! A user's *contacts* are their audience: the people they share presence with. Relative
//! to a user, a viewer is the owner (the user, or a backend with `presence:admin`), a
//! contact, or anyone else (including anonymous readers).

use serde::{Deserialize, Serialize};

use super::model::{empty_message, Presence, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    Everyone,
    Contacts,
    /// Invisible: appears offline to everyone else while using the service normally.
    Nobody,
}

impl Visibility {
    fn allows(self, rel: Relation) -> bool {
        match self {
            Visibility::Everyone => true,
            Visibility::Contacts => rel != Relation::Other,
            Visibility::Nobody => rel == Relation::Owner,
        }
    }
}

/// A user's privacy settings; the default shows everything to everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Privacy {
    #[serde(default)]
    pub visibility: Visibility,
    #[serde(default)]
    pub last_seen: Visibility,
}

/// How a viewer relates to the user being looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Relation {
    /// The user themself, or a backend acting with `presence:admin`.
    Owner,
    /// Listed in the user's contacts.
    Contact,
    /// Anyone else, anonymous readers included.
    Other,
}

impl Relation {
    pub const ALL: [Relation; 3] = [Relation::Owner, Relation::Contact, Relation::Other];

    pub fn index(self) -> usize {
        match self {
            Relation::Owner => 0,
            Relation::Contact => 1,
            Relation::Other => 2,
        }
    }
}

/// What `rel` may see of `p`.
///
/// Hidden status: `offline`, no message, no devices, no expiry, and no times at all (a
/// `last_seen` that keeps moving would give an invisible user away). Visible status with
/// hidden `last_seen`: `last_seen` is `null`.
pub fn project(p: &Presence, privacy: &Privacy, rel: Relation) -> Presence {
    if rel == Relation::Owner {
        return p.clone();
    }
    if !privacy.visibility.allows(rel) {
        return Presence {
            status: Status::Offline,
            message: empty_message(),
            last_seen: None,
            updated_at: None,
            expires_at: None,
            device_count: 0,
            ..p.clone()
        };
    }
    let mut out = p.clone();
    if !privacy.last_seen.allows(rel) {
        out.last_seen = None;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::UserId;
    use std::sync::Arc;

    fn busy() -> Presence {
        Presence {
            user_id: UserId::parse("alice", 64).unwrap(),
            status: Status::Busy,
            message: Arc::from("meeting"),
            last_seen: Some(10),
            updated_at: Some(10),
            node_id: Arc::from("n"),
            expires_at: Some(100),
            device_count: 2,
        }
    }

    #[test]
    fn everyone_sees_everything_by_default() {
        for rel in Relation::ALL {
            assert_eq!(project(&busy(), &Privacy::default(), rel), busy());
        }
    }

    #[test]
    fn contacts_only() {
        let p = Privacy { visibility: Visibility::Contacts, last_seen: Visibility::Contacts };
        assert_eq!(project(&busy(), &p, Relation::Contact), busy());
        let other = project(&busy(), &p, Relation::Other);
        assert_eq!((other.status, &*other.message, other.device_count, other.last_seen), (Status::Offline, "", 0, None));
    }

    #[test]
    fn invisible_appears_offline_to_all_but_the_owner() {
        let p = Privacy { visibility: Visibility::Nobody, last_seen: Visibility::Everyone };
        assert_eq!(project(&busy(), &p, Relation::Owner), busy());
        for rel in [Relation::Contact, Relation::Other] {
            let seen = project(&busy(), &p, rel);
            assert_eq!(seen.status, Status::Offline);
            assert_eq!(seen.last_seen, None, "a moving last_seen would betray an invisible user");
            assert_eq!(seen.updated_at, None);
        }
    }

    #[test]
    fn last_seen_can_be_hidden_separately() {
        let p = Privacy { visibility: Visibility::Everyone, last_seen: Visibility::Nobody };
        let seen = project(&busy(), &p, Relation::Contact);
        assert_eq!((seen.status, seen.last_seen), (Status::Busy, None));
        let p = Privacy { visibility: Visibility::Everyone, last_seen: Visibility::Contacts };
        assert_eq!(project(&busy(), &p, Relation::Contact).last_seen, Some(10));
        assert_eq!(project(&busy(), &p, Relation::Other).last_seen, None);
    }
}
