//! The rights of access and erasure (GDPR articles 15 and 17), for the user themself or an
//! admin: [`Service::export_user`] returns everything held about a user, and
//! [`Service::erase_user`] erases it everywhere.
//!
//! Erasure, in this order (each step is the ordinary, replicated write of its kind, so it
//! holds on every node and every backend):
//! 1. every device session of the user ends at once (their watchers see them go offline);
//! 2. the store's record (status, message, `last_seen`), with one `user_erased` event to
//!    the event streams and every sink (it carries nothing of the user but their id); the
//!    node holding a socket of the user closes it (4003). The embedded store then rewrites
//!    its file, so no freed page keeps an old copy. This comes before the directory, so
//!    that the user's privacy settings still apply to what watchers are told;
//! 3. the directory: their contacts and privacy settings, their place in other users'
//!    contact lists, and their conversation memberships.
//!
//! Afterwards the user reads as unknown (404). A client holding a valid token could sign
//! in again and start a new, empty record: revoke the user's tokens first.

use serde_json::json;

use super::Service;
use crate::audit::Subject;
use crate::auth::Identity;
use crate::bus::DirectoryChanged;
use crate::core::{Ending, Presence, Privacy, Session, UserId};
use crate::error::ApiError;

/// What an erasure removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    pub sessions_ended: usize,
    /// Other users' contact lists the user was removed from.
    pub removed_from_contacts: usize,
    /// Conversations the user was removed from.
    pub removed_from_conversations: usize,
}

/// Everything held about a user (the right of access).
#[derive(Debug, Clone)]
pub struct Export {
    /// The stored presence (status, message, `last_seen`, devices), as the user sees it.
    pub presence: Option<Presence>,
    pub sessions: Vec<Session>,
    pub privacy: Privacy,
    pub contacts: Vec<UserId>,
    pub conversations: Vec<String>,
    /// How many users list this one as a contact (who they are is their data).
    pub listed_as_contact_by: usize,
}

impl Service {
    /// The user's data, for the user or an admin; 404 when nothing is held.
    pub async fn export_user(&self, who: &Identity, user: &UserId) -> Result<Export, ApiError> {
        self.authorize_owner(who, user, "a user's data")?;
        self.check_write_rate(user)?;
        let presence = crate::store::get_one(&*self.store, user).await?;
        let sessions = self.sessions.devices(user).await?;
        let mut contacts: Vec<UserId> = self.directory.contacts(user).iter().cloned().collect();
        contacts.sort();
        let mut conversations: Vec<String> = self.directory.conversations_of(user).into_iter().map(|c| c.to_string()).collect();
        conversations.sort();
        let export = Export {
            presence,
            sessions,
            privacy: self.directory.privacy(user),
            contacts,
            conversations,
            listed_as_contact_by: self.directory.audience_of(user).len(),
        };
        if !export.holds_anything() {
            return Err(ApiError::NotFound(format!("user {user} not found")));
        }
        Ok(export)
    }

    /// Erases everything held about `user` (see the module documentation); 404 when
    /// nothing is held.
    pub async fn erase_user(&self, who: &Identity, user: &UserId) -> Result<Erased, ApiError> {
        if who.origin.gateway && !who.is_admin() {
            // Irreversible: not on the word of a header.
            return Err(ApiError::Forbidden(
                "erasing a user needs a token (the user's own, or one with presence:admin), not X-User-ID".into(),
            ));
        }
        let export = self.export_user(who, user).await?;
        let mut erased = Erased::default();
        for s in &export.sessions {
            if self.store.end_session(user, &s.device_id, None, Ending::Now).await? {
                erased.sessions_ended += 1;
            }
        }
        // Always (a user with directory rows only gets the event and the rewrite too).
        self.store.erase(user).await?;
        if !export.contacts.is_empty() {
            let old = self.directory.set_contacts(&*self.store, user, Vec::new()).await?;
            self.bus.publish_directory(DirectoryChanged::Contacts { user: user.clone(), changed: old.iter().cloned().collect() });
        }
        if export.privacy != Privacy::default() {
            let previous = self.directory.set_privacy(&*self.store, user, Privacy::default()).await?;
            self.bus.publish_directory(DirectoryChanged::Privacy { user: user.clone(), previous });
        }
        for owner in self.directory.audience_of(user) {
            let kept: Vec<UserId> = self.directory.contacts(&owner).iter().filter(|c| *c != user).cloned().collect();
            self.directory.set_contacts(&*self.store, &owner, kept).await?;
            self.bus.publish_directory(DirectoryChanged::Contacts { user: owner, changed: vec![user.clone()] });
            erased.removed_from_contacts += 1;
        }
        for conversation in self.directory.conversations_of(user) {
            let members =
                self.directory.members(&conversation).map(|m| m.iter().filter(|m| *m != user).cloned().collect()).unwrap_or_default();
            if let Some(change) = self.directory.set_members(&*self.store, &conversation, members).await? {
                self.bus.publish_directory(change);
            }
            erased.removed_from_conversations += 1;
        }
        metrics::counter!("presence_users_erased_total").increment(1);
        self.audit.record(
            who,
            Subject::User(user.as_str()),
            "user_erased",
            json!({
                "sessions_ended": erased.sessions_ended,
                "removed_from_contacts": erased.removed_from_contacts,
                "removed_from_conversations": erased.removed_from_conversations,
            }),
        );
        tracing::info!(user = %user, sessions = erased.sessions_ended, "user erased");
        Ok(erased)
    }
}

impl Export {
    fn holds_anything(&self) -> bool {
        self.presence.is_some()
            || !self.sessions.is_empty()
            || self.privacy != Privacy::default()
            || !self.contacts.is_empty()
            || !self.conversations.is_empty()
            || self.listed_as_contact_by > 0
    }
}
