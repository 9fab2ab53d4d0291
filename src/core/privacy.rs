//! Privacy rules (seed 004): who may see a user's status and `last_seen`.
//!
//! A user's *contacts* are their audience: the people they share presence with. Relative
//! to a user, a viewer is the owner (the user, or a backend with `presence:admin`), a
//! contact, or anyone else (including anonymous readers).

use serde::{Deserialize, Serialize};

use super::model::{empty_message, no_devices, DeviceSummary, Presence, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    Everyone,
    Contacts,
    /// Invisible: appears offline to everyone else while using the service normally.
    Nobody,
}

impl Visibility {
    /// Whether a viewer with relation `rel` may see what this setting covers.
    pub fn allows(self, rel: Relation) -> bool {
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
/// Hidden (the user's `visibility` does not allow `rel`, or the user is appearing
/// offline): `offline`, no message, no devices, no expiry, no node and no times at all,
/// the same answer whatever the user does, so neither content nor the moment of a
/// change gives them away (a `last_seen` that keeps moving would betray an invisible
/// user). Visible status with hidden `last_seen`: `last_seen` is `null`.
pub fn project(p: &Presence, privacy: &Privacy, rel: Relation) -> Presence {
    if rel == Relation::Owner {
        return p.clone();
    }
    if !privacy.visibility.allows(rel) || p.appear_offline {
        return Presence {
            user_id: p.user_id.clone(),
            status: Status::Offline,
            message: empty_message(),
            last_seen: None,
            updated_at: None,
            node_id: empty_message(),
            expires_at: None,
            device_count: 0,
            devices: no_devices(),
            idle_since: None,
            appear_offline: false,
            revision: p.revision,
        };
    }
    let mut out = p.clone();
    if !privacy.last_seen.allows(rel) {
        // The moments of activity go with last_seen: whether a device is active, and an
        // automatic away, stay (they are status).
        out.last_seen = None;
        out.idle_since = None;
        if out.devices.iter().any(|d| d.idle_since.is_some()) {
            let devices: Vec<DeviceSummary> = out.devices.iter().map(|d| DeviceSummary { idle_since: None, ..d.clone() }).collect();
            out.devices = devices.into();
        }
    }
    out
}

/// Whether a change from `before` to `after` shows `rel` anything: the rule that keeps
/// the *moment* of a hidden change from reaching a viewer (no push, no event).
pub fn visible_change(before: &Presence, after: &Presence, privacy: &Privacy, rel: Relation) -> bool {
    rel == Relation::Owner || !project(before, privacy, rel).same_view(&project(after, privacy, rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Platform, UserId};
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
            devices: Arc::from(vec![
                DeviceSummary::new(Arc::from("laptop"), Some(Platform::Desktop)),
                DeviceSummary::new(Arc::from("phone"), None),
            ]),
            idle_since: None,
            appear_offline: false,
            revision: 3,
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
        assert!(other.devices.is_empty() && other.node_id.is_empty());
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

    #[test]
    fn appearing_offline_looks_like_a_hidden_user_to_others() {
        let p = Presence { status: Status::Offline, message: Arc::from(""), appear_offline: true, ..busy() };
        assert_eq!(project(&p, &Privacy::default(), Relation::Owner), p);
        for rel in [Relation::Contact, Relation::Other] {
            let seen = project(&p, &Privacy::default(), rel);
            assert_eq!((seen.status, seen.device_count, seen.last_seen, seen.updated_at), (Status::Offline, 0, None, None));
            assert!(!seen.appear_offline, "that the user is hiding is not shown either");
        }
    }

    #[test]
    fn only_changes_a_viewer_can_see_are_changes_for_them() {
        let hidden = Privacy { visibility: Visibility::Contacts, last_seen: Visibility::Everyone };
        let before = busy();
        let mut after = busy();
        after.device_count = 1;
        after.last_seen = Some(20);
        after.updated_at = Some(20);
        after.node_id = Arc::from("other-node");
        after.revision = 4;
        assert!(visible_change(&before, &after, &hidden, Relation::Owner));
        assert!(visible_change(&before, &after, &hidden, Relation::Contact));
        assert!(!visible_change(&before, &after, &hidden, Relation::Other), "not even the moment");
        // A revision alone is not a change.
        let bumped = Presence { revision: 9, ..busy() };
        assert!(!visible_change(&busy(), &bumped, &Privacy::default(), Relation::Other));
    }
}
